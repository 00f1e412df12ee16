//! imip-milter: a milter for Postfix that takes emailed iMIP calendar replies
//! in-line, spools them durably and hands them to a calendar server.

pub mod address;
pub mod analysis;
pub mod config;
pub mod decision;
pub mod itip;
pub mod message;
pub mod spool;
pub mod forward;
pub mod target;
