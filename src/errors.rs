//! Error chains printed on one line.

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
