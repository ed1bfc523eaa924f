#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| chatpipe_fuzz::chat_decoder(data));
