//! What more than one target needs.

/// Applies edits of 4 bytes each (kind, position high, position low, byte) to `token`: replace,
/// insert or remove a byte. `None` when the result is not UTF-8 or is `token` unchanged.
pub fn mutate(token: &str, edits: &[u8]) -> Option<String> {
    let mut t = token.as_bytes().to_vec();
    for e in edits.chunks_exact(4) {
        let at = usize::from(u16::from_be_bytes([e[1], e[2]]));
        match e[0] % 3 {
            0 if !t.is_empty() => {
                let i = at % t.len();
                t[i] = e[3];
            }
            1 => t.insert(at % (t.len() + 1), e[3]),
            2 if !t.is_empty() => {
                t.remove(at % t.len());
            }
            _ => {}
        }
    }
    String::from_utf8(t).ok().filter(|m| m != token)
}
