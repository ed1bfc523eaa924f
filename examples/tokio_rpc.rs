//! A request/response service and its client on tokio.
//!
//! ```text
//! cargo run --features tokio --example tokio_rpc -- serve 127.0.0.1:4000
//! cargo run --features tokio --example tokio_rpc -- call 127.0.0.1:4000 hello world
//! cargo run --features tokio --example tokio_rpc              # both, in one process
//! ```
//!
//! The service answers each request with its body in upper case. The
//! client sends all its requests at once (pipelined; the connection picks
//! the ids and matches the answers) and prints the answers in order.
//!
//! In your own `Cargo.toml`:
//!
//! ```toml
//! chatpipe = { version = "0.2", default-features = false, features = ["tokio"] }
//! ```

use bytes::Bytes;
use chatpipe::raw::{Raw, RawMessage};
use chatpipe::Builder;
use futures::StreamExt;
use tokio::net::{TcpListener, TcpStream};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Serves every connection on `listener` in a task of its own.
async fn serve(listener: TcpListener) -> Result<(), Error> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let (sender, mut requests, conn) = Builder::new()
            .label(peer.to_string())
            .build_tokio(stream, Raw);
        // The driver does all the I/O; it ends when the connection does.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("{peer}: {e}");
            }
        });
        tokio::spawn(async move {
            while let Some(Ok(msg)) = requests.next().await {
                if let RawMessage::Request { id, body } = msg {
                    let body = Bytes::from(body.to_ascii_uppercase());
                    // Fails only once the connection is gone.
                    if sender
                        .send(RawMessage::Response { id, body })
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        });
    }
}

/// Sends every word as a request, all at once, and returns the answers.
async fn call(addr: &str, words: &[String]) -> Result<Vec<String>, Error> {
    let stream = TcpStream::connect(addr).await?;
    let (client, _incoming, conn) = Builder::new().build_tokio(stream, Raw);
    let driver = tokio::spawn(conn);
    let calls = words.iter().map(|w| client.call(Bytes::from(w.clone())));
    let answers = futures::future::try_join_all(calls).await?;
    // Close cleanly: the driver resolves once both sides are done.
    client.close();
    driver.await??;
    Ok(answers
        .iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => {
            let addr = args.get(1).map_or("127.0.0.1:4000", String::as_str);
            let listener = TcpListener::bind(addr).await?;
            println!("listening on {}", listener.local_addr()?);
            serve(listener).await
        }
        Some("call") if args.len() >= 3 => {
            for answer in call(&args[1], &args[2..]).await? {
                println!("{answer}");
            }
            Ok(())
        }
        None => {
            // Both ends in one process: a quick demonstration.
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?.to_string();
            tokio::spawn(serve(listener));
            let words = ["hello", "from", "tokio"].map(String::from);
            for answer in call(&addr, &words).await? {
                println!("{answer}");
            }
            Ok(())
        }
        _ => Err("usage: tokio_rpc [serve ADDR | call ADDR WORD...]".into()),
    }
}
