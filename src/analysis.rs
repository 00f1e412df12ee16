//! analyse: raw message → what it is (reply, bounce, other, malformed).
//! Pure code, no I/O: the milter, `deliver` and `inspect` all run it.

use crate::{
    itip::{self, Itip},
    message::{self, DeliveryStatus},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An iTIP REPLY from an attendee.
    Reply,
    /// A delivery report saying an invitation could not be delivered.
    Bounce,
    /// A delivery report that needs no answer (delayed, relayed, delivered,
    /// expanded): taken quietly, since refusing it makes a double bounce.
    Report,
    /// Mail that is no reply: a person's text, a forwarded invitation, TNEF.
    Other,
    /// Calendar data that cannot be read.
    Malformed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reply => "reply",
            Self::Bounce => "bounce",
            Self::Report => "report",
            Self::Other => "other",
            Self::Malformed => "malformed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    pub kind: Kind,
    /// One sentence: why the message is what it is.
    pub reason: String,
    pub itip: Option<Itip>,
    /// The calendar text taken, decoded, as received.
    pub icalendar: Option<String>,
    pub bounce: Option<DeliveryStatus>,
    /// Message-IDs of the message a bounce returns, as quoted in it.
    pub returned_message_ids: Vec<String>,
    pub message_id: Option<String>,
    pub from: Option<String>,
    pub authentication_results: Option<String>,
    pub all_authentication_results: Vec<String>,
    /// A bounce read from another form than RFC 3464's (`Report::loose`):
    /// believed from the null sender only.
    pub loose_report: bool,
}

impl Analysis {
    /// Stands in when the analysis itself could not run.
    pub fn failed() -> Self {
        Self::new(Kind::Malformed, "analysis failed")
    }

    /// Whom the message answers for, and with what: a reply's ATTENDEE and
    /// PARTSTAT; for a bounce the failed recipient and no PARTSTAT (a failed
    /// delivery is nobody's answer).
    pub fn answer(&self) -> (Option<String>, Option<String>) {
        match self.kind {
            Kind::Bounce => (self.failed_recipient(), None),
            _ => match &self.itip {
                Some(i) => (i.attendee.clone(), i.partstat.clone()),
                None => (None, None),
            },
        }
    }

    /// A bounce's failed final recipient, as a `mailto:` URI.
    pub fn failed_recipient(&self) -> Option<String> {
        let r = self.bounce.as_ref()?.final_recipient.as_deref()?.trim();
        let r = r.strip_prefix('<').and_then(|r| r.strip_suffix('>')).unwrap_or(r);
        (!r.is_empty()).then(|| itip::normalise_mailto(r))
    }

    fn new(kind: Kind, reason: impl Into<String>) -> Self {
        Self {
            kind,
            reason: reason.into(),
            itip: None,
            icalendar: None,
            bounce: None,
            returned_message_ids: Vec::new(),
            message_id: None,
            from: None,
            authentication_results: None,
            all_authentication_results: Vec::new(),
            loose_report: false,
        }
    }
}

/// Events, tasks and journals one calendar reply may hold by default
/// (`max_components`): a master and its overrides, with room to spare.
pub const DEFAULT_MAX_COMPONENTS: usize = 1000;

/// ATTENDEEs one component of a reply may list by default (`max_attendees`):
/// a reply names its sender; a meeting's whole list is room to spare.
pub const DEFAULT_MAX_ATTENDEES: usize = 1000;

/// What a calendar reply may hold; more is refused as unreadable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Scheduling components (VEVENT, VTODO, VJOURNAL).
    pub components: usize,
    /// ATTENDEE properties in any one component.
    pub attendees: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            components: DEFAULT_MAX_COMPONENTS,
            attendees: DEFAULT_MAX_ATTENDEES,
        }
    }
}

/// Analyses one message as it arrived (headers and body).
pub fn analyse(raw: &[u8]) -> Analysis {
    analyse_bounded(raw, Limits::default())
}

/// As `analyse`; a reply with more components or attendees than `limits`
/// is refused (applying it would cost CPU and space without bound).
pub fn analyse_bounded(raw: &[u8], limits: Limits) -> Analysis {
    // A panic in a parser must not become a lost reply or a dead session:
    // whatever cannot be parsed is refused as unreadable.
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| message::read(raw)));
    let summary = match read {
        Ok(Ok(s)) => s,
        Ok(Err(reason)) => return Analysis::new(Kind::Malformed, reason),
        Err(_) => return Analysis::new(Kind::Malformed, "the message structure cannot be read"),
    };
    let classified = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| classify(&summary, limits)));
    let mut analysis =
        classified.unwrap_or_else(|_| Analysis::new(Kind::Malformed, "the calendar data cannot be read"));
    analysis.message_id = summary.message_id;
    analysis.from = summary.from;
    analysis.authentication_results = summary.authentication_results;
    analysis.all_authentication_results = summary.all_authentication_results;
    analysis
}

fn classify(summary: &message::MessageSummary, limits: Limits) -> Analysis {
    if let Some(report) = &summary.report {
        if report.status.action != "failed" {
            let mut a = Analysis::new(
                Kind::Report,
                format!(
                    "a delivery report with action \"{}\" needs no answer from the calendar",
                    report.status.action
                ),
            );
            a.bounce = Some(report.status.clone());
            return a;
        }
        let mut a = Analysis::new(
            Kind::Bounce,
            if report.loose {
                "delivery of an invitation failed (a report read from its text)"
            } else {
                "delivery of an invitation failed"
            },
        );
        a.loose_report = report.loose;
        // The returned invitation, when the report carries it whole.
        if let Some(part) = report.returned_calendars.first() {
            a.itip = itip::read(&part.text, part.method_param.as_deref()).ok();
            a.icalendar = Some(part.text.clone());
        }
        a.bounce = Some(report.status.clone());
        a.returned_message_ids = report.returned_message_ids.clone();
        return a;
    }

    if summary.calendars.is_empty() {
        if let Some(problem) = summary.undecodable.first() {
            return Analysis::new(Kind::Malformed, problem.clone());
        }
        let reason = if summary.has_tnef {
            "the reply is in Outlook's TNEF format (winmail.dat), which carries no readable calendar data; \
             please send it as iCalendar"
        } else if summary.attached_calendars > 0 {
            "the calendar data is inside a forwarded message; please answer the invitation with your calendar program"
        } else {
            "this address only takes calendar replies and the message has no calendar data; \
             please write to the organizer directly"
        };
        return Analysis::new(Kind::Other, reason);
    }

    // Google sends the same data twice; take the first readable REPLY, else
    // the first readable part, else report the first error.
    let mut first_ok: Option<(Itip, &message::CalendarPart)> = None;
    let mut first_err: Option<String> = None;
    for part in &summary.calendars {
        match itip::read(&part.text, part.method_param.as_deref()) {
            Ok(i) if i.method.as_deref() == Some("REPLY") => {
                first_ok = Some((i, part));
                break;
            }
            Ok(i) => {
                if first_ok.is_none() {
                    first_ok = Some((i, part));
                }
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let Some((itip, part)) = first_ok else {
        return Analysis::new(
            Kind::Malformed,
            first_err.unwrap_or_else(|| "the calendar data cannot be read".into()),
        );
    };

    let mut a = match itip.method.as_deref() {
        Some("REPLY" | "COUNTER" | "REFRESH") if itip.components == 0 => {
            Analysis::new(Kind::Malformed, "the calendar reply holds no event or task")
        }
        Some(_) if itip.components > limits.components => Analysis::new(
            Kind::Malformed,
            format!(
                "the calendar data holds {} events or tasks, more than the {} this gateway takes",
                itip.components, limits.components
            ),
        ),
        Some(_) if itip.most_attendees > limits.attendees => Analysis::new(
            Kind::Malformed,
            format!(
                "the calendar data lists {} attendees in one event, more than the {} this gateway takes",
                itip.most_attendees, limits.attendees
            ),
        ),
        Some(m @ ("REPLY" | "COUNTER" | "REFRESH")) if itip.uid.is_none() => {
            Analysis::new(Kind::Malformed, format!("the calendar message (METHOD:{m}) has no UID"))
        }
        // Nobody's answer: no PARTSTAT may come of it. With local tokens the
        // organizer gets the message to read (decide_with_organizer).
        Some(m @ ("REPLY" | "COUNTER" | "REFRESH")) if itip.attendee.is_none() => Analysis::new(
            Kind::Other,
            format!(
                "the calendar message (METHOD:{m}) names no attendee, so it answers for nobody; \
                 please answer the invitation with your calendar program or write to the organizer"
            ),
        ),
        Some("REPLY") => Analysis::new(Kind::Reply, "calendar reply"),
        // An attendee's other iTIP messages travel as replies do; the caldav
        // target, which cannot act on them, has them redirected. (DECLINECOUNTER
        // is the organizer's, sent to an attendee: never an answer here.)
        Some(m @ ("COUNTER" | "REFRESH")) => Analysis::new(Kind::Reply, format!("calendar {}", m.to_ascii_lowercase())),
        Some(m @ ("REQUEST" | "ADD" | "CANCEL" | "PUBLISH")) => Analysis::new(
            Kind::Other,
            format!(
                "the calendar data is an invitation (METHOD:{m}), not a reply; \
                 please answer it with your calendar program or write to the organizer"
            ),
        ),
        Some(m) => Analysis::new(
            Kind::Other,
            format!(
                "calendar messages with METHOD:{} are not taken here; please write to the organizer",
                m.chars().take(20).collect::<String>()
            ),
        ),
        None => Analysis::new(
            Kind::Other,
            "the calendar data has no METHOD, so it is no reply; please answer with your calendar program",
        ),
    };
    a.icalendar = Some(part.text.clone());
    a.itip = Some(itip);
    a
}
