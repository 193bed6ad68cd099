//! The call log's chunk decoder (`keygate_core::calls::decode_chunk`): the store's bytes are read
//! back by every list and export, and a damaged file must give an error, never a panic or an
//! allocation the input cannot describe. The input is the chunk's bytes. Whatever decodes is
//! encoded again and must decode to the same calls.
#![no_main]

use keygate_core::calls::{ChunkRow, call_id, decode_chunk, encode_chunk};
use keygate_core::ids::WorkspaceId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ws = WorkspaceId::from_trusted("ws_fuzz".into());
    let row = ChunkRow { id: 9, workspace_id: &ws, token_id: None, app_id: None };
    let Ok(calls) = decode_chunk(data, row) else { return };
    assert!(calls.len() <= keygate_core::calls::CHUNK_CALLS);
    for (i, c) in calls.iter().enumerate() {
        assert_eq!(c.id, call_id(9, i));
    }
    let again = encode_chunk(&calls.iter().collect::<Vec<_>>());
    match decode_chunk(&again, row) {
        Ok(back) => assert_eq!(back, calls),
        Err(e) => panic!("its own encoding is refused: {e}"),
    }
});
