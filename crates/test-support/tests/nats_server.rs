//! NatsServer: start, stop, restart and clean-up, checked over the NATS protocol.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use beamline_test_support::{NatsCluster, NatsServer};

/// A minimal NATS client speaking the text protocol.
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    info: String,
}

impl Client {
    fn connect(port: u16) -> Client {
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect to nats");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("set timeout");
        let writer = stream.try_clone().expect("clone stream");
        let mut reader = BufReader::new(stream);
        let mut info = String::new();
        reader.read_line(&mut info).expect("read INFO");
        let mut client = Client {
            reader,
            writer,
            info,
        };
        client.send("CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true}\r\nSUB _INBOX.test 1\r\n");
        client
    }

    fn send(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).expect("write");
    }

    /// Publishes `payload` to `subject` with a reply subject and returns the reply.
    fn request(&mut self, subject: &str, payload: &str) -> String {
        self.send(&format!(
            "PUB {subject} _INBOX.test {}\r\n{payload}\r\n",
            payload.len()
        ));
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).expect("read from nats");
            if line.starts_with("PING") {
                self.send("PONG\r\n");
            } else if let Some(rest) = line.strip_prefix("MSG ") {
                let len: usize = rest
                    .split_whitespace()
                    .last()
                    .and_then(|n| n.parse().ok())
                    .expect("MSG length");
                let mut body = vec![0; len + 2];
                self.reader.read_exact(&mut body).expect("read MSG body");
                body.truncate(len);
                return String::from_utf8(body).expect("utf-8 reply");
            } else if line.starts_with("-ERR") {
                panic!("nats error: {line}");
            }
        }
    }
}

fn assert_refused(port: u16) {
    let result = TcpStream::connect((Ipv4Addr::LOCALHOST, port));
    assert!(result.is_err(), "port {port} should be closed");
}

fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z'),
        Err(_) => false,
    }
}

#[test]
fn start_serves_info_with_jetstream() {
    let nats = NatsServer::start();
    assert!(nats.is_running());
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{}", nats.port()));
    let client = Client::connect(nats.port());
    assert!(client.info.starts_with("INFO {"), "{}", client.info);
    assert!(
        client.info.contains("\"jetstream\":true"),
        "{}",
        client.info
    );
}

#[test]
fn stop_and_restart_keep_the_port_and_the_jetstream_store() {
    let mut nats = NatsServer::start();
    let port = nats.port();
    {
        let mut client = Client::connect(port);
        let created = client.request(
            "$JS.API.STREAM.CREATE.ORDERS",
            r#"{"name":"ORDERS","subjects":["orders.>"],"storage":"file"}"#,
        );
        assert!(!created.contains("\"error\""), "{created}");
        let ack = client.request("orders.1", "hello");
        assert!(ack.contains("\"stream\":\"ORDERS\""), "{ack}");
    }

    nats.stop();
    assert!(!nats.is_running());
    assert_eq!(nats.pid(), None);
    assert_refused(port);
    nats.stop(); // stopping twice is harmless

    nats.restart();
    assert!(nats.is_running());
    assert_eq!(nats.port(), port);
    let mut client = Client::connect(port);
    assert!(client.info.starts_with("INFO "), "{}", client.info);
    let info = client.request("$JS.API.STREAM.INFO.ORDERS", "");
    assert!(
        info.contains("\"messages\":1"),
        "the stream should survive: {info}"
    );

    // restart() on a running server stops it first.
    let before = nats.pid().expect("running");
    nats.restart();
    let after = nats.pid().expect("running");
    assert_ne!(before, after);
    assert!(!process_alive(before));
}

#[test]
fn drop_kills_the_server_and_removes_its_directory() {
    let nats = NatsServer::start();
    let pid = nats.pid().expect("running");
    let port = nats.port();
    let dir = nats.store_dir().to_path_buf();
    assert!(dir.is_dir());
    drop(nats);
    assert!(!process_alive(pid), "nats-server {pid} should be gone");
    assert!(!dir.exists(), "{} should be removed", dir.display());
    assert_refused(port);
}

#[test]
fn servers_get_distinct_ports() {
    let a = NatsServer::start();
    let b = NatsServer::start();
    assert_ne!(a.port(), b.port());
    assert_ne!(a.store_dir(), b.store_dir());
}

/// A paused server keeps its connections but answers nothing (a PING gets no PONG);
/// resumed, it answers again; a paused server is still killed on drop.
#[test]
fn pause_freezes_the_server_and_resume_thaws_it() {
    let server = NatsServer::start();
    let mut client = Client::connect(server.port());
    client
        .writer
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    server.pause();
    client.send("PING\r\n");
    let mut line = String::new();
    let frozen = client.reader.read_line(&mut line);
    assert!(frozen.is_err(), "a paused server answered: {line:?}");
    server.resume();
    client
        .writer
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut line = String::new();
    client
        .reader
        .read_line(&mut line)
        .expect("answer after resume");
    assert_eq!(line, "PONG\r\n");
    let pid = server.pid().unwrap();
    server.pause();
    drop(server);
    assert!(!process_alive(pid), "a paused server outlived its drop");
}

/// A configured server applies its configuration (here: a token), and its
/// monitoring endpoint names the connected clients.
#[test]
fn a_configured_server_applies_its_configuration() {
    let server = NatsServer::start_with_config("authorization { token: \"t0k3n\" }\n");
    let mut refused = Client::connect(server.port());
    refused.send("PING\r\n");
    let mut line = String::new();
    refused.reader.read_line(&mut line).unwrap();
    assert!(line.contains("Authorization Violation"), "{line:?}");

    let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, server.port())).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut info = String::new();
    reader.read_line(&mut info).unwrap();
    writer
        .write_all(
            b"CONNECT {\"verbose\":false,\"auth_token\":\"t0k3n\",\"name\":\"probe\"}\r\nPING\r\n",
        )
        .unwrap();
    let mut pong = String::new();
    reader.read_line(&mut pong).unwrap();
    assert_eq!(pong, "PONG\r\n");
    assert_eq!(server.connection_names(), vec!["probe".to_string()]);
}

/// Three nodes route to each other: a message published on one reaches a subscriber
/// on another; dropping the cluster stops every node.
#[test]
fn a_cluster_routes_messages_between_nodes_and_stops_on_drop() {
    let cluster = NatsCluster::start(3);
    assert!(cluster.is_routed());
    let ports: Vec<u16> = cluster.nodes().iter().map(|n| n.port()).collect();
    let mut subscriber = Client::connect(ports[0]);
    subscriber.send("SUB cluster.test 9\r\nPING\r\n");
    let mut line = String::new();
    subscriber.reader.read_line(&mut line).unwrap(); // PONG: the SUB is in
    subscriber
        .writer
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut publisher = Client::connect(ports[2]);
    let mut received = false;
    for _ in 0..100 {
        publisher.send("PUB cluster.test 5\r\nhello\r\n");
        let mut line = String::new();
        if subscriber.reader.read_line(&mut line).is_ok() && line.starts_with("MSG cluster.test") {
            received = true;
            break;
        }
    }
    assert!(received, "a message did not cross the cluster");
    let pids: Vec<u32> = cluster.nodes().iter().filter_map(|n| n.pid()).collect();
    assert_eq!(pids.len(), 3);
    drop(cluster);
    for pid in pids {
        assert!(!process_alive(pid), "node {pid} outlived the cluster");
    }
}
