//! The one way baton prints an error: the error and its causes, joined by ": ".
//!
//! Every module keeps its own `thiserror` enum and chains causes with `#[source]` instead of repeating them in
//! its message; [`chain`] is where a chain becomes one line (a log line, an API answer, the CLI's stderr). It
//! owns no error type and imports nothing of the crate, so every layer may use it.

/// An error with its causes, joined by ": ".
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::chain;

    /// An error with a message and an optional cause.
    #[derive(Debug, thiserror::Error)]
    #[error("{message}")]
    struct Layer {
        /// What this layer says.
        message: &'static str,
        /// What it failed on.
        #[source]
        cause: Option<Box<Layer>>,
    }

    #[test]
    fn causes_follow_the_error_joined_by_colons() {
        let error = Layer {
            message: "admin: listen 127.0.0.1:9900",
            cause: Some(Box::new(Layer {
                message: "bind",
                cause: Some(Box::new(Layer {
                    message: "address already in use",
                    cause: None,
                })),
            })),
        };
        assert_eq!(
            chain(&error),
            "admin: listen 127.0.0.1:9900: bind: address already in use"
        );
        let alone = Layer {
            message: "no cause",
            cause: None,
        };
        assert_eq!(chain(&alone), "no cause");
    }
}
