//! The token stores behind one trait: this host's redb file and PostgreSQL
//! shared by every host, held to the same tests; and the milter on the
//! PostgreSQL store, through a database outage (451 at RCPT, never 550).

mod common;

use common::{postgres::Postgres, InProcess, Webhook};
use imip_milter::tokens::{self, CalendarServerTokens, Lookup, PostgresTokens, RedbTokens, TokenRecord, TokenStore};
use indymilter_test::{Status, TestConnection};
use std::time::Duration;

/// What every backend must do alike. CalendarServer's table has no column
/// for the invitations' Message-IDs.
async fn exercise(s: &dyn TokenStore, keeps_invitations: bool) {
    let a = tokens::mint_or_reuse(
        s,
        "mailto:alice@example.org",
        "mailto:bob@example.com",
        "u1",
        Some("<inv-1@example.org>"),
        1,
    )
    .await
    .unwrap();
    // One token per (organizer, attendee, UID), whatever the case of the addresses.
    let b = tokens::mint_or_reuse(
        s,
        "MAILTO:Alice@example.org",
        "mailto:BOB@example.com",
        "u1",
        Some("<inv-2@example.org>"),
        2,
    )
    .await
    .unwrap();
    assert_eq!(a.token, b.token);
    let got = s.get(&a.token).await.unwrap().unwrap();
    if keeps_invitations {
        assert_eq!(got.invitations, ["<inv-1@example.org>", "<inv-2@example.org>"]);
    }
    // A shared token keeps its attendees.
    let shared = tokens::mint_or_reuse_shared(
        s,
        "mailto:alice@example.org",
        "u2",
        &["mailto:carol@example.com".into(), "mailto:dana@example.com".into()],
        None,
        3,
    )
    .await
    .unwrap();
    let back = s.get(&shared.token).await.unwrap().unwrap();
    assert_eq!(back.attendees, ["mailto:carol@example.com", "mailto:dana@example.com"]);
    assert_eq!(s.list().await.unwrap().len(), 2);
    // Expiry counts from the last use; a use moves it.
    assert!(matches!(
        tokens::lookup(s, &a.token, 89 * 86_400_000, 90).await.unwrap(),
        Lookup::Valid(_)
    ));
    assert_eq!(
        tokens::lookup(s, &a.token, 91 * 86_400_000, 90).await.unwrap(),
        Lookup::Expired
    );
    s.touch(&a.token, 50 * 86_400_000).await.unwrap();
    assert!(matches!(
        tokens::lookup(s, &a.token, 91 * 86_400_000, 90).await.unwrap(),
        Lookup::Valid(_)
    ));
    // Revoked tokens are unknown, and a use does not bring them back.
    assert!(s.revoke(&a.token).await.unwrap());
    assert!(!s.revoke(&a.token).await.unwrap());
    s.touch(&a.token, 60 * 86_400_000).await.unwrap();
    assert_eq!(tokens::lookup(s, &a.token, 0, 90).await.unwrap(), Lookup::Unknown);
    assert!(s
        .find("mailto:alice@example.org", "mailto:bob@example.com", "u1")
        .await
        .unwrap()
        .is_none());
    // Imported rows replace by token.
    let imported = TokenRecord {
        token: "8e3c0d1a-5b7e-4f61-9a0c-2d4f3b6a7c81".into(),
        organizer: "mailto:alice@example.org".into(),
        attendee: "mailto:erik@example.com".into(),
        uid: "u3".into(),
        created_ms: 5,
        last_used_ms: 5,
        attendees: Vec::new(),
        invitations: Vec::new(),
    };
    s.put(&imported).await.unwrap();
    s.put(&imported).await.unwrap();
    assert_eq!(s.get(&imported.token).await.unwrap(), Some(imported.clone()));
    // Purge removes what was last used before the cutoff, and only that.
    let fresh = tokens::mint_or_reuse(s, "mailto:alice@example.org", "mailto:jo@example.com", "u7", None, 100)
        .await
        .unwrap();
    assert_eq!(s.purge(50).await.unwrap(), 2);
    assert_eq!(s.get(&imported.token).await.unwrap(), None);
    assert_eq!(s.get(&shared.token).await.unwrap(), None);
    assert!(s.get(&fresh.token).await.unwrap().is_some());
    assert!(s.revoke(&fresh.token).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_stores_keep_the_same_contract() {
    let dir = tempfile::tempdir().unwrap();
    let spool = imip_milter::spool::Spool::open(&dir.path().join("spool.redb")).unwrap();
    exercise(&RedbTokens::new(&spool).unwrap(), true).await;
    let pg = Postgres::start();
    exercise(&PostgresTokens::new(&pg.url(), None).unwrap(), true).await;
    pg.calendarserver_schema();
    let cs = CalendarServerTokens::new(&pg.url(), None).unwrap();
    exercise(&cs, false).await;
    // CalendarServer keeps one token per (organizer, attendee, UID): a shared
    // token is a row per attendee, and takes the place of an earlier one.
    let alone = tokens::mint_or_reuse(
        &cs,
        "mailto:alice@example.org",
        "mailto:frank@example.com",
        "u4",
        None,
        7,
    )
    .await
    .unwrap();
    let both = tokens::mint_or_reuse_shared(
        &cs,
        "mailto:alice@example.org",
        "u4",
        &["mailto:Frank@example.com".into(), "mailto:gina@example.com".into()],
        None,
        8,
    )
    .await
    .unwrap();
    assert_ne!(alone.token, both.token);
    assert_eq!(cs.get(&alone.token).await.unwrap(), None);
    let again = tokens::mint_or_reuse_shared(
        &cs,
        "mailto:alice@example.org",
        "u4",
        &["mailto:gina@example.com".into()],
        None,
        9,
    )
    .await
    .unwrap();
    assert_eq!(again.token, both.token);
    // An invitation to one of them later keeps the shared token whole.
    let frank = tokens::mint_or_reuse(
        &cs,
        "mailto:alice@example.org",
        "mailto:frank@example.com",
        "u4",
        None,
        10,
    )
    .await
    .unwrap();
    assert_eq!(frank.token, both.token);
    let rows = pg.psql(&format!(
        "SELECT string_agg(attendee, ' ' ORDER BY attendee) FROM imip_tokens WHERE token = '{}'",
        both.token
    ));
    assert_eq!(rows, "mailto:frank@example.com mailto:gina@example.com");
    // A token whose rows name two events is no capability for either.
    pg.psql(
        "INSERT INTO imip_tokens (token, organizer, attendee, icaluid) VALUES \
         ('dup-token-0001', 'mailto:alice@example.org', 'mailto:hana@example.com', 'u5'), \
         ('dup-token-0001', 'mailto:alice@example.org', 'mailto:ivan@example.com', 'u6')",
    );
    assert_eq!(cs.get("dup-token-0001").await.unwrap(), None);
    // Purge: one statement for what was last used before the cutoff.
    pg.psql("UPDATE imip_tokens SET accessed = timezone('UTC', now()) - interval '100 days' WHERE icaluid = 'u5'");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // The token of u5 and the shared one, written with 1970's times above.
    assert_eq!(cs.purge(now - 90 * 86_400_000).await.unwrap(), 2);
    assert_eq!(pg.psql("SELECT count(*) FROM imip_tokens WHERE icaluid = 'u5'"), "0");
    // A table that is not CalendarServer's is said so.
    let elsewhere =
        CalendarServerTokens::new(&format!("postgresql://imip@127.0.0.1:{}/postgres", pg.port), None).unwrap();
    let err = elsewhere.get("x").await.unwrap_err().to_string();
    assert!(err.contains("IMIP_TOKENS"), "{err}");
}

async fn rcpt(m: &InProcess, rcpt: &str) -> Status {
    let mut conn = TestConnection::configure().open_tcp(m.addr).await.unwrap();
    conn.connect("client.example.com", [192, 0, 2, 33]).await.unwrap();
    conn.mail(["<bob@example.com>"]).await.unwrap();
    let st = conn.rcpt([rcpt]).await.unwrap();
    let _ = conn.close().await;
    st
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_milter_on_postgres_answers_451_while_the_database_is_down() {
    let mut pg = Postgres::start();
    let hook = Webhook::start();
    let local = format!(
        "\n[tokens]\nmode = \"local\"\nstore = \"postgres\"\nurl = \"{}\"\n",
        pg.url()
    );
    let m = InProcess::start_with(&hook.url(), &local).await;
    let token = m.add_token(&local, "pg-1");
    let gateway = format!("<calendar+{token}@example.org>");
    assert_eq!(rcpt(&m, &gateway).await, Status::Continue);
    match rcpt(&m, "<calendar+00000000-0000-4000-8000-000000000000@example.org>").await {
        Status::Reject { message: Some(msg) } => assert!(msg.to_string_lossy().starts_with("550 5.1.1 ")),
        other => panic!("{other:?}"),
    }
    let check = |m: &InProcess| {
        let out = m.cli(&local, &["check"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("tokens"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let up = check(&m);
    assert!(up.contains("OK") && up.contains("answers a lookup"), "{up}");
    // The database goes away: the sender is asked to retry, never refused.
    pg.stop();
    let down = check(&m);
    assert!(down.contains("FAIL") && down.contains("tokens.url"), "{down}");
    let started = std::time::Instant::now();
    match rcpt(&m, &gateway).await {
        Status::Tempfail { message: Some(msg) } => assert!(msg.to_string_lossy().starts_with("451 4.3.0 "), "{msg:?}"),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    // And back: the same token passes again.
    pg.run();
    assert!(
        common::wait_until(Duration::from_secs(15), || {
            let rt = tokio::runtime::Handle::current();
            tokio::task::block_in_place(|| rt.block_on(rcpt(&m, &gateway))) == Status::Continue
        }),
        "the token passes once the database is back"
    );
    m.stop().await;
}

/// TLS when the URL asks for it, and then only with a certificate that
/// verifies: the database's own CA in sslrootcert, never a server that
/// merely offers TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_over_tls_is_verified() {
    let (pg, ca) = Postgres::start_tls();
    let url = pg.url();
    let lookup = |url: String| async move {
        let s = PostgresTokens::new(&url, None).map_err(|e| imip_milter::errors::chain(&e))?;
        s.get("probe")
            .await
            .map(|_| ())
            .map_err(|e| imip_milter::errors::chain(&e))
    };
    let verified = format!("{url}?sslmode=verify-full&sslrootcert={}", ca.display());
    lookup(verified).await.unwrap();
    // The server refuses plain TCP: the test above did speak TLS.
    let plain = lookup(url.clone()).await.unwrap_err();
    assert!(plain.contains("no encryption"), "{plain}");
    // `require` verifies too: the built-in roots know nothing of this CA.
    let unverified = lookup(format!("{url}?sslmode=require")).await.unwrap_err();
    assert!(unverified.contains("certificate"), "{unverified}");
    // A name the certificate does not hold.
    let other_name = format!(
        "{}?sslmode=require&sslrootcert={}",
        url.replace("127.0.0.1", "localhost"),
        ca.display()
    );
    let wrong = lookup(other_name).await.unwrap_err();
    assert!(wrong.contains("certificate"), "{wrong}");
}

/// A database that takes the connection and never answers: every lookup,
/// queued ones included, ends within the bound and is an error (451). The
/// four that hold a connection give up after the statement time (3 s); the
/// ones queued for a connection sooner, after tokens.pool_wait (1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_never_answers_costs_at_most_the_bound() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming() {
            held.push(c);
        }
    });
    let store =
        std::sync::Arc::new(PostgresTokens::new(&format!("postgresql://imip@127.0.0.1:{port}/imip"), None).unwrap());
    let started = std::time::Instant::now();
    let lookups: Vec<_> = (0..12)
        .map(|_| {
            let s = store.clone();
            tokio::spawn(async move { s.get("probe").await })
        })
        .collect();
    let (mut waited, mut queued) = (0, 0);
    for l in lookups {
        let err = l.await.unwrap().unwrap_err().to_string();
        if err.contains("no answer in 3s") {
            waited += 1;
        } else {
            assert!(err.contains("all 4 connections busy for 1000ms"), "{err}");
            queued += 1;
        }
    }
    assert_eq!((waited, queued), (4, 8));
    assert!(started.elapsed() < Duration::from_secs(6), "{:?}", started.elapsed());
}

/// A database answering in 150 ms (a busy or distant server), one client
/// flooding unknown tokens over 40 sessions: another client's valid token
/// is still answered within a second. The flood is refused without the
/// database once over its limit, its lookups in flight are capped, and a
/// lookup waits for a pooled connection a bounded time of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_tokens_leaves_the_database_to_other_clients() {
    use std::sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    };
    let pg = Postgres::start();
    let slow = common::proxy::SlowProxy::start(pg.port, Duration::from_millis(150));
    let hook = Webhook::start();
    let local = format!(
        "\n[tokens]\nmode = \"local\"\nstore = \"postgres\"\nurl = \"postgresql://imip@127.0.0.1:{}/imip\"\n",
        slow.port
    );
    let m = InProcess::start_with(&hook.url(), &local).await;
    let token = m.add_token(&local, "flood-1");

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let flood: Vec<_> = (0..40u32)
        .map(|session| {
            let (stop, sent, addr) = (stop.clone(), sent.clone(), m.addr);
            tokio::spawn(async move {
                let mut conn = TestConnection::configure()
                    .read_timeout(Duration::from_secs(30))
                    .open_tcp(addr)
                    .await
                    .unwrap();
                conn.connect("prober.example.net", [198, 51, 100, 7]).await.unwrap();
                conn.mail(["<x@prober.example.net>"]).await.unwrap();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let guess = format!("<calendar+{session:08x}-0000-4000-8000-{n:012x}@example.org>");
                    let st = conn.rcpt([guess.as_str()]).await.unwrap();
                    assert!(!matches!(st, Status::Continue), "{st:?}");
                    sent.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
                let _ = conn.close().await;
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let gateway = format!("<calendar+{token}@example.org>");
    let mut waited = Vec::new();
    for _ in 0..5 {
        let mut conn = TestConnection::configure()
            .read_timeout(Duration::from_secs(30))
            .open_tcp(m.addr)
            .await
            .unwrap();
        conn.connect("mx.example.com", [192, 0, 2, 50]).await.unwrap();
        conn.mail(["<bob@example.com>"]).await.unwrap();
        let started = std::time::Instant::now();
        let st = conn.rcpt([gateway.as_str()]).await.unwrap();
        waited.push((started.elapsed(), st));
        let _ = conn.close().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }
    eprintln!(
        "flood: {} RCPTs; the valid token waited {:?}",
        sent.load(Ordering::Relaxed),
        waited.iter().map(|(d, _)| d.as_millis()).collect::<Vec<_>>()
    );
    for (d, st) in &waited {
        assert_eq!(*st, Status::Continue, "{waited:?}");
        assert!(*d < Duration::from_secs(1), "{waited:?}");
    }
    m.stop().await;
}
