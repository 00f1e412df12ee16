//! Errors at the boundaries: what failed (context) with why (`source()`),
//! and their chains printed on one line.

/// Declares an error type of one boundary (spool, token store): its text
/// says what failed and where, `source()` the cause (redb's, the system's,
/// a client library's). Cheap to clone: one failure may answer several
/// waiting callers.
macro_rules! context_error {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $name {
            context: String,
            source: Option<std::sync::Arc<dyn std::error::Error + Send + Sync>>,
        }

        impl $name {
            /// An error whose text says all there is (no cause behind it).
            pub fn new(context: impl Into<String>) -> Self {
                Self { context: context.into(), source: None }
            }

            /// `context` failed because of `cause`.
            pub fn with(context: impl Into<String>, cause: impl std::error::Error + Send + Sync + 'static) -> Self {
                Self { context: context.into(), source: Some(std::sync::Arc::new(cause)) }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.context)
            }
        }

        impl std::error::Error for $name {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
            }
        }
    };
}
pub(crate) use context_error;

/// `e` and each of its causes (`source()`), joined with ": ": what a log
/// line or a command's message prints of an error.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("spool write")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn every_cause_follows_its_context() {
        let e = Outer(std::io::Error::other("No space left on device"));
        assert_eq!(chain(&e), "spool write: No space left on device");
        assert_eq!(chain(&std::io::Error::other("alone")), "alone");
    }
}
