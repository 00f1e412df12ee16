//! What `imip-milter check` reports: one finding per thing looked at, with
//! its level; the targets and the token store report theirs the same way.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub topic: &'static str,
    pub text: String,
}

impl Finding {
    pub fn ok(topic: &'static str, text: impl Into<String>) -> Self {
        Self {
            level: Level::Ok,
            topic,
            text: text.into(),
        }
    }
    pub fn warn(topic: &'static str, text: impl Into<String>) -> Self {
        Self {
            level: Level::Warn,
            topic,
            text: text.into(),
        }
    }
    pub fn fail(topic: &'static str, text: impl Into<String>) -> Self {
        Self {
            level: Level::Fail,
            topic,
            text: text.into(),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            Level::Ok => "OK  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        write!(f, "{level} {}: {}", self.topic, self.text)
    }
}
