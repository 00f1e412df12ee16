//! A TCP proxy that holds back what the server sends: a busy or distant
//! database, made of a real one. Each chunk from the server reaches the
//! client `delay` after it arrived (latency, not a cap on throughput);
//! what the client sends goes through at once.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

pub struct SlowProxy {
    pub port: u16,
}

impl SlowProxy {
    /// Listens on a free loopback port and forwards to 127.0.0.1:`server_port`.
    pub fn start(server_port: u16, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let port = listener.local_addr().expect("proxy port").port();
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", server_port)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                forward(&client, &server, Duration::ZERO);
                forward(&server, &client, delay);
            }
        });
        Self { port }
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read.
fn forward(from: &TcpStream, to: &TcpStream, delay: Duration) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    thread::spawn(move || {
        let mut buf = vec![0; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
    thread::spawn(move || {
        for (due, chunk) in rx {
            thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
