//! Reading the answers of the HTTP hooks logic calls (the bot webhook, the room hook) under a
//! size cap: a hook is trusted to answer, not to fill logic's memory.

/// Largest answer read; a longer one fails the call instead of filling memory.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Why an HTTP answer's body could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// Longer than allowed.
    #[error("answer longer than {0} bytes")]
    TooLong(usize),
    /// The client's timeout ran out while reading.
    #[error("reading the answer: {0}")]
    Timeout(reqwest::Error),
    /// Any other failure.
    #[error("reading the answer: {0}")]
    Failed(reqwest::Error),
}

/// Reads an answer's body, at most [`MAX_ANSWER_BYTES`] (the bot webhook's and the room hook's
/// answers: trusted to answer, not to fill memory).
pub(crate) async fn read_capped(mut resp: reqwest::Response) -> Result<bytes::Bytes, ReadError> {
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
    {
        return Err(ReadError::TooLong(MAX_ANSWER_BYTES));
    }
    let mut body = bytes::BytesMut::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                    return Err(ReadError::TooLong(MAX_ANSWER_BYTES));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body.freeze()),
            Err(e) if e.is_timeout() => return Err(ReadError::Timeout(e)),
            Err(e) => return Err(ReadError::Failed(e)),
        }
    }
}
