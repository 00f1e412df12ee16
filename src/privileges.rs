//! Root never works in a directory a less privileged user controls: a
//! command started as root becomes the daemon's user (`user`, by default
//! the owner of `state_dir`) before it opens anything there. A symlink the
//! owner planted in state_dir then leads nowhere the owner could not go.

use crate::config::Config;
use std::{ffi::CString, os::unix::fs::MetadataExt, path::Path};

/// Who the process runs as after `drop_to_owner`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

/// The user `config` names, or the owner of state_dir (of the directory it
/// will be made in, when it does not exist yet).
pub fn target(config: &Config) -> Result<Identity, String> {
    if let Some(name) = &config.user {
        return lookup(name);
    }
    let dir = &config.state_dir;
    let meta = std::fs::symlink_metadata(dir)
        .or_else(|_| std::fs::metadata(dir.parent().unwrap_or(Path::new("/"))))
        .map_err(|e| format!("state_dir {}: {e}", dir.display()))?;
    if meta.file_type().is_symlink() {
        return Err(format!(
            "state_dir {} is a symlink; name the real directory",
            dir.display()
        ));
    }
    Ok(Identity {
        uid: meta.uid(),
        gid: meta.gid(),
    })
}

/// Run as root: become the target identity (no change when that is root).
/// Returns the identity the process now has.
pub fn drop_to_owner(config: &Config) -> Result<Identity, String> {
    // SAFETY: geteuid/getegid have no preconditions and cannot fail.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if euid != 0 {
        return Ok(Identity { uid: euid, gid: egid });
    }
    let id = target(config)?;
    if id.uid == 0 {
        return Ok(Identity { uid: 0, gid: egid });
    }
    // SAFETY: plain system calls on integers; each result is checked, and
    // the group list is given up before the user.
    unsafe {
        if libc::setgroups(1, &id.gid) != 0 || libc::setgid(id.gid) != 0 || libc::setuid(id.uid) != 0 {
            return Err(format!(
                "cannot become uid {} gid {} (the owner of state_dir, or `user`): {}",
                id.uid,
                id.gid,
                std::io::Error::last_os_error()
            ));
        }
        if libc::setuid(0) == 0 {
            return Err("gave up root but could take it back; refusing to go on".into());
        }
    }
    Ok(id)
}

/// uid and primary gid of a user name.
fn lookup(name: &str) -> Result<Identity, String> {
    let c = CString::new(name).map_err(|_| format!("user: `{name}` is no user name"))?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives it and its
    // length is passed; the answer is read only when `result` is set.
    let rc = unsafe { libc::getpwnam_r(c.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return Err(format!("user: no user `{name}` on this host"));
    }
    Ok(Identity {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_looked_up_and_unknown_ones_named() {
        assert_eq!(lookup("root").unwrap().uid, 0);
        let e = lookup("no-such-user-imip").unwrap_err();
        assert!(e.contains("no-such-user-imip"), "{e}");
    }
}
