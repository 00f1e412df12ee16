//! The whole milter session as Postfix drives it, with outbound
//! tokenization on: connect, MAIL (with or without a SASL login), RCPT to a
//! gateway address with a valid token and/or an external attendee, DATA,
//! every header, the body, end of message. Input: one byte of flags, then a
//! message. A panic anywhere in the daemon aborts (libFuzzer's hook), even
//! where the milter catches it and answers 451.
#![no_main]

use imip_milter::{
    config::Config,
    control::{self, Request},
};
use indymilter_test::{MacroStage, Status, TestConnection};
use libfuzzer_sys::fuzz_target;
use std::{ffi::CString, net::SocketAddr, sync::OnceLock, time::Duration};

struct Milter {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    gateway: String,
    _dir: tempfile::TempDir,
}

fn milter() -> &'static Milter {
    static MILTER: OnceLock<Milter> = OnceLock::new();
    MILTER.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = format!(
            "listen = \"inet:127.0.0.1:0\"\nstate_dir = \"{}\"\nmax_message_bytes = 1000000\n\n\
             [gateway]\naddresses = [\"calendar@example.org\"]\n\n\
             [target]\nkind = \"webhook\"\nurl = \"http://127.0.0.1:9/\"\n\n\
             [delivery]\ninitial_backoff = \"1h\"\nmax_backoff = \"1h\"\n\n\
             [tokens]\nmode = \"local\"\n\n\
             [outbound]\nenabled = true\norganizer_domains = [\"example.org\"]\ntrusted_clients = [\"192.0.2.0/24\"]\n",
            dir.path().display()
        );
        let config = Config::parse(&text).expect("config");
        imip_milter::prepare_state_dir(&config).expect("state_dir");
        let add = Request::TokensAdd {
            organizer: "alice@example.org".into(),
            attendees: vec!["bob@example.com".into(), "carol@example.com".into()],
            uid: "fuzz-event@example.org".into(),
        };
        let resp = control::request_or_open(&config, &add).expect("token");
        let token = resp.tokens.and_then(|t| t.first().map(|t| t.token.clone())).expect("token");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let control = config.control_path();
        let addr = rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(imip_milter::run(config, listener, std::future::pending::<()>()));
            for _ in 0..500 {
                if std::os::unix::net::UnixStream::connect(&control).is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            addr
        });
        Milter {
            rt,
            addr,
            gateway: format!("<calendar+{token}@example.org>"),
            _dir: dir,
        }
    })
}

fn cstring(b: &[u8]) -> CString {
    CString::new(b.iter().copied().filter(|c| *c != 0).collect::<Vec<u8>>()).unwrap_or_default()
}

/// Header fields as the milter protocol carries them: name, unfolded value.
fn headers(head: &[u8]) -> Vec<(CString, CString)> {
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for line in head.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.first().is_some_and(|c| *c == b' ' || *c == b'\t') {
            if let Some(last) = out.last_mut() {
                last.1.extend_from_slice(b"\r\n");
                last.1.extend_from_slice(line);
            }
            continue;
        }
        if let Some(colon) = line.iter().position(|c| *c == b':') {
            let (name, value) = line.split_at(colon);
            let value = value.get(1..).unwrap_or_default();
            let value = value.strip_prefix(b" ").unwrap_or(value);
            out.push((name.to_vec(), value.to_vec()));
        }
    }
    out.into_iter().take(500).map(|(n, v)| (cstring(&n), cstring(&v))).collect()
}

async fn session(m: &Milter, flags: u8, message: &[u8]) -> Option<()> {
    let mut conn = TestConnection::configure().open_tcp(m.addr).await.ok()?;
    let client = if flags & 1 != 0 { [192, 0, 2, 7] } else { [198, 51, 100, 7] };
    conn.connect("client.example", client).await.ok()?;
    if flags & 2 != 0 {
        conn.macros(MacroStage::Mail, [("{auth_authen}", "alice@example.org")])
            .await
            .ok()?;
    }
    if conn.mail(["<alice@example.org>"]).await.ok()? != Status::Continue {
        return None;
    }
    let external = "<bob@example.com>".to_owned();
    let rcpts: Vec<&String> = match (flags >> 2) & 3 {
        0 => vec![&m.gateway],
        1 => vec![&external],
        2 => vec![&m.gateway, &external],
        _ => vec![&external, &m.gateway],
    };
    for r in rcpts {
        conn.rcpt([r.as_str()]).await.ok()?;
    }
    conn.macros(MacroStage::Data, [("i", "FUZZ1")]).await.ok()?;
    if conn.data().await.ok()? != Status::Continue {
        return None;
    }
    let split = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, p + 4))
        .or_else(|| message.windows(2).position(|w| w == b"\n\n").map(|p| (p, p + 2)))
        .unwrap_or((message.len(), message.len()));
    let (head, body) = (message.get(..split.0)?, message.get(split.1..)?);
    for (name, value) in headers(head) {
        if conn.header(name, value).await.ok()? != Status::Continue {
            return None;
        }
    }
    if conn.eoh().await.ok()? != Status::Continue {
        return None;
    }
    for chunk in body.chunks(65_535) {
        if conn.body(chunk.to_vec()).await.ok()? != Status::Continue {
            return None;
        }
    }
    conn.eom().await.ok()?;
    conn.close().await.ok()
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, message)) = data.split_first() else { return };
    let m = milter();
    m.rt.block_on(session(m, flags, message));
});
