// The browser client of chatpipe's chat room: protocol v0.6 (docs/PROTOCOL.md)
// over a WebSocket whose binary messages carry the bytes of the chat stream.
// Plain JavaScript, no framework: what it does mirrors chat/src/client.rs.
"use strict";

(() => {
  // --- The wire format -------------------------------------------------
  const T = {
    CHAT: 0, BROADCAST: 1, KEEPALIVE: 2, SET_NICKNAME: 3, ACK: 4, NAK: 5,
    HELLO: 16, WELCOME: 17, NOTICE: 18, SAY: 19, DIRECT: 20, PRIVATE: 21,
    WHO: 22, MEMBERS: 23, PRESENCE: 24, HISTORY: 25, LOGIN: 26,
  };
  const MAX_PAYLOAD = 65813; // chat::MAX_PAYLOAD_LEN
  const WANTED = ["ack", "direct", "presence", "history", "account"];
  const utf8 = new TextEncoder();
  const fromUtf8 = new TextDecoder("utf-8", { fatal: true });

  class Malformed extends Error {}

  // Builds one frame: 4-byte big-endian length, then the payload.
  class Writer {
    constructor(type) { this.parts = []; this.u32(type); }
    u8(n) { this.parts.push(Uint8Array.of(n)); return this; }
    u16(n) { this.parts.push(Uint8Array.of(n >> 8, n & 255)); return this; }
    u32(n) { const b = new Uint8Array(4); new DataView(b.buffer).setUint32(0, n); this.parts.push(b); return this; }
    bytes(b) { this.parts.push(b); return this; }
    short(s) {
      const b = utf8.encode(s);
      if (b.length > 255) throw new RangeError("over 255 bytes");
      return this.u8(b.length).bytes(b);
    }
    long(s) {
      const b = typeof s === "string" ? utf8.encode(s) : s;
      if (b.length > 65535) throw new RangeError("over 65,535 bytes");
      return this.u16(b.length).bytes(b);
    }
    frame() {
      const len = this.parts.reduce((n, p) => n + p.length, 0);
      const out = new Uint8Array(4 + len);
      new DataView(out.buffer).setUint32(0, len);
      let at = 4;
      for (const p of this.parts) { out.set(p, at); at += p.length; }
      return out;
    }
  }

  // Reads one payload's fields; running short is Malformed.
  class Reader {
    constructor(bytes) { this.b = bytes; this.at = 0; this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length); }
    need(n) { if (this.at + n > this.b.length) throw new Malformed("truncated message"); }
    u8() { this.need(1); return this.b[this.at++]; }
    u16() { this.need(2); const v = this.view.getUint16(this.at); this.at += 2; return v; }
    u32() { this.need(4); const v = this.view.getUint32(this.at); this.at += 4; return v; }
    u64() { const hi = this.u32(); const lo = this.u32(); return hi * 4294967296 + lo; }
    take(n) { this.need(n); const v = this.b.subarray(this.at, this.at + n); this.at += n; return v; }
    id() { return hex(this.take(16)); }
    str(n) {
      try { return fromUtf8.decode(this.take(n)); } catch (e) {
        if (e instanceof Malformed) throw e;
        throw new Malformed("a string that is not UTF-8");
      }
    }
    short() { return this.str(this.u8()); }
    long() { return this.str(this.u16()); }
  }

  const hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  const randomId = () => crypto.getRandomValues(new Uint8Array(16));

  // One payload as a message object, or null for a type this client skips.
  function decode(payload) {
    const r = new Reader(payload);
    const type = r.u32();
    switch (type) {
      case T.BROADCAST: return { type, from: r.short(), text: r.long() };
      case T.KEEPALIVE: return { type };
      case T.ACK: return { type, id: r.id() };
      case T.NAK: return { type, id: r.id(), message: r.long() };
      case T.WELCOME: {
        const m = { type, id: r.id(), version: r.u16(), caps: [] };
        for (let n = r.u8(); n > 0; n--) m.caps.push(r.short());
        m.maxFrame = r.u32(); m.rate = r.u32(); m.burst = r.u32(); m.keepaliveMs = r.u32();
        return m;
      }
      case T.NOTICE: return { type, text: r.long() };
      case T.PRIVATE: return { type, from: r.short(), text: r.long() };
      case T.MEMBERS: {
        const m = { type, id: r.id(), total: r.u32(), names: [] };
        for (let n = r.u16(); n > 0; n--) m.names.push(r.short());
        return m;
      }
      case T.PRESENCE: return { type, change: r.u8(), nickname: r.short(), newNickname: r.short() };
      case T.HISTORY: return { type, atMs: r.u64(), from: r.short(), text: r.long() };
      default: return null; // unknown types are skipped, whole
    }
  }

  // --- The page --------------------------------------------------------
  const $ = (id) => document.getElementById(id);
  const joinForm = $("join"), room = $("room"), log = $("log"), messages = $("messages");
  const input = $("input"), inputNote = $("input-note"), statusEl = $("status");
  const secure = location.protocol === "https:";
  const plaintextOk = document.body.dataset.plaintextCredentials === "yes";
  const passwordsAllowed = secure || plaintextOk;
  if (!passwordsAllowed) {
    $("password").disabled = true;
    $("register").disabled = true;
    $("password-note").hidden = false;
  }

  const state = {
    nick: "",          // the nickname asked for, or held
    credentials: null, // "login\0nick\0pw" kept in memory only, for reconnecting
    ws: null,
    welcomed: false,
    everWelcomed: false,
    caps: new Set(),
    pending: new Map(), // request id (hex) -> what to do with its answer
    members: new Set(),
    inbuf: new Uint8Array(0),
    lastIn: 0, lastOut: 0, keepaliveMs: 5000,
    timer: null,
    retries: 0,
    retryTimer: null,
    stopped: true,
    seen: new Set(),  // "from\0text" of lines shown: history after a reconnect skips them
  };

  function setStatus(text, up) {
    statusEl.textContent = text;
    statusEl.className = up ? "up" : "down";
  }

  const two = (n) => String(n).padStart(2, "0");
  function clock(ms) { const d = new Date(ms); return `${two(d.getHours())}:${two(d.getMinutes())}`; }

  // Appends a line without touching the input; follows the end only if
  // the reader was already there.
  function addLine(kind, parts, atMs) {
    const follow = messages.scrollHeight - messages.scrollTop - messages.clientHeight < 40;
    const li = document.createElement("li");
    li.className = kind;
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = clock(atMs || Date.now());
    li.append(time);
    for (const [cls, text] of parts) {
      const span = document.createElement("span");
      span.className = cls;
      span.textContent = text;
      li.append(span);
    }
    log.append(li);
    // Bounded: the oldest lines go past 2,000.
    while (log.childElementCount > 2000) log.firstElementChild.remove();
    if (follow) messages.scrollTop = messages.scrollHeight;
    return li;
  }
  const info = (text) => addLine("info", [["text", text]]);
  function said(kind, from, text, atMs) {
    state.seen.add(from + "\0" + text);
    return addLine(kind, [["from", from], ["text", text]], atMs);
  }

  function renderMembers() {
    const ul = $("members");
    ul.replaceChildren();
    for (const name of [...state.members].sort((a, b) => a.localeCompare(b))) {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = name;
      b.title = `direct message to ${name}`;
      if (name === state.nick) li.className = "self";
      // A click starts a direct message, keeping what was typed.
      b.addEventListener("click", () => {
        if (!input.value.startsWith("/msg ")) input.value = `/msg ${name} ${input.value}`;
        input.focus();
      });
      li.append(b);
      ul.append(li);
    }
    $("count").textContent = `(${state.members.size})`;
  }

  function send(frame) {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
    state.ws.send(frame);
    state.lastOut = Date.now();
    return true;
  }

  // A request: `answer(msg)` gets its Ack, Nak, Welcome or Members.
  function request(type, fill, answer) {
    const id = randomId();
    const w = new Writer(type).bytes(id);
    fill(w);
    const frame = w.frame();
    if (!send(frame)) return false;
    state.pending.set(hex(id), answer);
    return true;
  }

  // --- The connection --------------------------------------------------
  function connect() {
    clearTimeout(state.retryTimer);
    state.stopped = false;
    setStatus(state.everWelcomed ? "reconnecting: connecting…" : "connecting…", false);
    const ws = new WebSocket(`${secure ? "wss" : "ws"}://${location.host}/ws`);
    ws.binaryType = "arraybuffer";
    state.ws = ws;
    state.welcomed = false;
    state.inbuf = new Uint8Array(0);
    state.pending.clear();
    ws.onopen = () => {
      state.lastIn = state.lastOut = Date.now();
      const creds = state.credentials ? utf8.encode(state.credentials) : new Uint8Array(0);
      request(T.HELLO, (w) => {
        w.u8(2).u16(0x0005).u16(0x0006).u8(WANTED.length);
        for (const c of WANTED) w.short(c);
        w.long(creds);
      }, welcomed);
      state.timer = setInterval(tick, 1000);
    };
    ws.onmessage = (ev) => {
      if (ws !== state.ws) return;
      state.lastIn = Date.now();
      try { received(new Uint8Array(ev.data)); } catch (e) {
        if (!(e instanceof Malformed)) throw e;
        info(`! the server sent a malformed message (${e.message}); reconnecting`);
        ws.close(1002, "malformed message");
      }
    };
    ws.onclose = (ev) => {
      if (ws !== state.ws) return;
      lost(ev.reason ? `${ev.reason}` : "");
    };
  }

  // Keepalives, both ways: one sent when we said nothing for an interval,
  // and a server silent for three is taken for gone.
  function tick() {
    const now = Date.now();
    if (now - state.lastOut >= state.keepaliveMs) send(new Writer(T.KEEPALIVE).frame());
    if (now - state.lastIn > 3 * state.keepaliveMs && state.ws) {
      info("! no word from the server: reconnecting");
      state.ws.close();
      lost("");
    }
  }

  function received(bytes) {
    // Frames may span messages, or share one.
    const joined = new Uint8Array(state.inbuf.length + bytes.length);
    joined.set(state.inbuf);
    joined.set(bytes, state.inbuf.length);
    let at = 0;
    while (joined.length - at >= 4) {
      const len = new DataView(joined.buffer, at, 4).getUint32(0);
      if (len > MAX_PAYLOAD) throw new Malformed(`a frame of ${len} bytes`);
      if (joined.length - at - 4 < len) break;
      const msg = decode(joined.subarray(at + 4, at + 4 + len));
      at += 4 + len;
      if (msg) handle(msg);
      if (state.ws === null) return; // handling it closed the connection
    }
    state.inbuf = joined.slice(at);
  }

  function handle(m) {
    switch (m.type) {
      case T.ACK: case T.NAK: case T.WELCOME: case T.MEMBERS: {
        const answer = state.pending.get(m.id);
        if (!answer) throw new Malformed("an answer to no request");
        state.pending.delete(m.id);
        answer(m);
        break;
      }
      case T.BROADCAST: said("", m.from, m.text); break;
      case T.PRIVATE:
        addLine("private", [["tag", "[private]"], ["from", m.from], ["text", m.text]]);
        break;
      case T.HISTORY:
        // After a reconnect, the history repeats what is on screen already.
        if (state.seen.has(m.from + "\0" + m.text)) break;
        said("history", m.from, m.text, m.atMs);
        break;
      case T.NOTICE: addLine("notice", [["text", `! server: ${m.text}`]]); break;
      case T.PRESENCE:
        if (m.change === 0) {
          state.members.add(m.nickname); info(`* ${m.nickname} joined`);
          // Who lists a member without a nickname by its address, and
          // presence never names that address: the one who just joined by
          // name may be listed by it still. Ask again then (only then).
          if ([...state.members].some((n) => ADDRESS.test(n))) who(false);
        }
        else if (m.change === 1) { state.members.delete(m.nickname); info(`* ${m.nickname} left`); }
        else if (m.change === 2) {
          state.members.delete(m.nickname); state.members.add(m.newNickname);
          info(`* ${m.nickname} is now ${m.newNickname}`);
        }
        renderMembers();
        break;
      default: break; // keepalives
    }
  }

  function welcomed(m) {
    if (m.type === -1) return; // the connection went first
    if (m.type === T.NAK) {
      // A refused Hello: the server closes. Wrong credentials do not get
      // better by retrying.
      stop(`refused: ${m.message}`);
      return;
    }
    if (m.type !== T.WELCOME) throw new Malformed("a Hello answered with neither Welcome nor Nak");
    state.welcomed = true;
    state.caps = new Set(m.caps);
    state.keepaliveMs = Math.max(1000, m.keepaliveMs || 5000);
    const again = state.everWelcomed;
    if (state.credentials) {
      joined(again); // logged in: the nickname is ours
    } else {
      request(T.SET_NICKNAME, (w) => w.short(state.nick), (a) => {
        if (a.type === -1) return;
        if (a.type === T.ACK) { joined(again); return; }
        if (again) {
          // Our old connection may still hold it until it times out.
          info(`! nickname refused: ${a.message}; trying again`);
          state.ws.close();
          lost("");
        } else {
          stop(`nickname refused: ${a.message}`);
        }
      });
    }
  }

  function joined(again) {
    state.everWelcomed = true;
    state.retries = 0;
    $("me").textContent = state.nick;
    setStatus(`connected as ${state.nick}`, true);
    info(again ? `* reconnected as ${state.nick}` : `* you are ${state.nick}`);
    who(false);
  }

  // How the room names a member without a nickname: its address.
  const ADDRESS = /^(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:.]+\]):\d+$/;

  function who(show) {
    if (!state.caps.has("presence")) return;
    request(T.WHO, () => {}, (m) => {
      if (m.type !== T.MEMBERS) return;
      state.members = new Set(m.names);
      renderMembers();
      if (show) {
        const more = m.total > m.names.length ? `, and ${m.total - m.names.length} more` : "";
        info(`* in the room (${m.total}): ${m.names.join(", ")}${more}`);
      }
    });
  }

  // The connection is gone: what was waiting for an answer is marked, and
  // we try again after a backoff (0.5 s doubling to 15 s, with jitter).
  function lost(why) {
    clearInterval(state.timer);
    const ws = state.ws;
    state.ws = null;
    if (ws) { ws.onclose = ws.onmessage = null; }
    for (const answer of state.pending.values()) answer({ type: -1 });
    state.pending.clear();
    if (state.stopped) return;
    const delay = Math.min(15000, 500 * 2 ** state.retries) * (0.75 + Math.random() / 2);
    state.retries = Math.min(state.retries + 1, 10);
    const secs = Math.max(1, Math.round(delay / 1000));
    setStatus(`reconnecting in ${secs} s${why ? ` (${why})` : ""}`, false);
    if (state.everWelcomed && state.retries === 1) info("! connection lost: reconnecting");
    state.retryTimer = setTimeout(connect, delay);
  }

  // Gives up: back to the join form, saying why.
  function stop(why) {
    state.stopped = true;
    const ws = state.ws;
    lost("");
    if (ws) ws.close();
    setStatus("not connected", false);
    if (state.everWelcomed) {
      info(`! ${why}`);
    } else {
      room.hidden = true;
      joinForm.hidden = false;
      $("join-error").textContent = why;
      $("nick").focus();
    }
  }

  // --- What the user does ---------------------------------------------
  joinForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const nick = $("nick").value.trim();
    const password = $("password").value;
    if (!nick || utf8.encode(nick).length > 255 || nick.includes("\0")) {
      $("join-error").textContent = "a nickname is 1 to 255 bytes";
      return;
    }
    state.nick = nick;
    state.credentials = null;
    if (password && passwordsAllowed) {
      const scheme = $("register").checked ? "register" : "login";
      state.credentials = `${scheme}\0${nick}\0${password}`;
    }
    $("password").value = "";
    $("join-error").textContent = "";
    joinForm.hidden = true;
    room.hidden = false;
    input.focus();
    connect();
  });

  // An own line, pending until the server acks it.
  function own(kind, parts) {
    const li = addLine(`own ${kind}`, parts);
    const mark = document.createElement("span");
    mark.className = "mark pending";
    mark.textContent = "…";
    mark.title = "sent, not yet acknowledged";
    li.append(mark);
    return (a) => {
      if (a.type === T.ACK) {
        mark.className = "mark acked"; mark.textContent = "✓"; mark.title = "in the room";
      } else if (a.type === T.NAK) {
        mark.className = "mark refused"; mark.textContent = `✗ ${a.message}`; mark.title = "refused";
      } else {
        mark.className = "mark refused"; mark.textContent = "? connection lost before the server acknowledged it";
      }
    };
  }

  $("say").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const line = input.value;
    if (!line.trim()) return;
    if (!state.welcomed) {
      // Kept in the input, not lost: sent once reconnected, by Enter again.
      inputNote.textContent = "not connected: your message is kept, send it again once reconnected";
      return;
    }
    inputNote.textContent = "";
    let ok = true;
    try {
      if (line.startsWith("/msg ")) {
        const m = /^\/msg\s+(\S+)\s+([\s\S]+)$/.exec(line);
        if (!m) { inputNote.textContent = "usage: /msg NICK text"; return; }
        const [, to, text] = m;
        if (!state.caps.has("direct")) { inputNote.textContent = "this server does not take direct messages"; return; }
        const settle = own("direct", [["tag", `→ ${to}`], ["text", text]]);
        ok = request(T.DIRECT, (w) => w.short(to).long(text), settle);
      } else if (line.startsWith("/nick ")) {
        const name = line.slice(6).trim();
        ok = request(T.SET_NICKNAME, (w) => w.short(name), (a) => {
          if (a.type === T.ACK) {
            state.nick = name; $("me").textContent = name;
            setStatus(`connected as ${name}`, true);
            info(`* you are now ${name}`);
          } else if (a.type === T.NAK) info(`! nickname refused: ${a.message}`);
        });
      } else if (line.trim() === "/who") {
        who(true);
      } else {
        const settle = own("", [["from", state.nick], ["text", line]]);
        state.seen.add(state.nick + "\0" + line);
        ok = request(T.SAY, (w) => w.long(line), settle);
      }
    } catch (e) {
      if (!(e instanceof RangeError)) throw e;
      inputNote.textContent = `too long: ${e.message}`;
      return;
    }
    if (ok) input.value = "";
  });
})();
