//! Cluster mode against scripted nodes (a few lines of RESP over TCP), for
//! what a real cluster does not do on demand: a demoted master answering a
//! script with `READONLY`, and a connection lost right after a write was
//! sent.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis_failover::{ErrorKind, FailoverClient, NodeAddr};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// What a scripted node does with one command.
enum Answer {
    Reply(String),
    /// Close the connection without answering.
    Hang,
}

type Script = Arc<dyn Fn(&[String]) -> Answer + Send + Sync>;

/// Starts a node that answers every command as `script` says; its port.
async fn scripted_node(script: Script) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream, Arc::clone(&script)));
        }
    });
    port
}

async fn serve(stream: TcpStream, script: Script) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    while let Some(command) = read_command(&mut read).await {
        match script(&command) {
            Answer::Reply(reply) => {
                if write.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
            }
            Answer::Hang => return,
        }
    }
}

/// Reads one command (a RESP array of bulk strings).
async fn read_command(read: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Option<Vec<String>> {
    let mut line = String::new();
    read.read_line(&mut line).await.ok()?;
    let count: usize = line.trim().strip_prefix('*')?.parse().ok()?;
    let mut args = Vec::with_capacity(count);
    for _ in 0..count {
        line.clear();
        read.read_line(&mut line).await.ok()?;
        line.clear();
        read.read_line(&mut line).await.ok()?;
        args.push(line.trim_end().to_owned());
    }
    Some(args)
}

/// The `CLUSTER SLOTS` reply of a cluster whose one master on `port`
/// serves every slot.
fn all_slots_on(port: u16) -> String {
    format!("*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n:{port}\r\n")
}

fn is(command: &[String], name: &str) -> bool {
    command
        .first()
        .is_some_and(|c| c.eq_ignore_ascii_case(name))
}

/// What every scripted node answers besides its own script.
fn common(command: &[String], owner: u16) -> Answer {
    if is(command, "CLUSTER") {
        return Answer::Reply(all_slots_on(owner));
    }
    if is(command, "PING") {
        return Answer::Reply("+PONG\r\n".to_owned());
    }
    Answer::Reply("-ERR unknown command\r\n".to_owned())
}

fn client(port: u16) -> redis_failover::FailoverClient {
    FailoverClient::cluster([NodeAddr::new("127.0.0.1", port).unwrap()])
        .retry_budget(Duration::from_secs(5))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_script_refused_with_readonly_refreshes_the_map_and_is_resent() {
    // Who owns every slot, as both nodes tell it: the first, until it
    // refuses a script as a demoted master would.
    let owner = Arc::new(Mutex::new(0u16));
    let new_master = {
        let owner = Arc::clone(&owner);
        scripted_node(Arc::new(move |command: &[String]| {
            if is(command, "EVAL") {
                return Answer::Reply("+OK\r\n".to_owned());
            }
            common(command, *owner.lock().unwrap())
        }))
        .await
    };
    let demoted = {
        let owner = Arc::clone(&owner);
        scripted_node(Arc::new(move |command: &[String]| {
            if is(command, "EVAL") {
                *owner.lock().unwrap() = new_master;
                return Answer::Reply(
                    "-READONLY You can't write against a read only replica.\r\n".to_owned(),
                );
            }
            common(command, *owner.lock().unwrap())
        }))
        .await
    };
    *owner.lock().unwrap() = demoted;
    let client = client(demoted);
    let script = redis::cmd("EVAL")
        .arg("return redis.call('SET', KEYS[1], 'v')")
        .arg(1)
        .arg("k")
        .clone();
    // Not idempotent: READONLY means it did not run, so resending is safe.
    let reply: String = client.query(&script).await.unwrap();
    assert_eq!(reply, "OK");
    assert_eq!(
        client.master_of("k"),
        Some(NodeAddr::new("127.0.0.1", new_master).unwrap())
    );
}

#[tokio::test]
async fn a_write_whose_connection_is_lost_is_resent_only_if_idempotent() {
    // The first two SETs are lost with their connection.
    let (node, sets) = set_counting_node(|set| match set {
        1 | 2 => Answer::Hang,
        _ => Answer::Reply("+OK\r\n".to_owned()),
    })
    .await;
    let client = client(node);

    let error = client.set("k", "v").await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::OutcomeUnknown, "{error}");
    assert_eq!(*sets.lock().unwrap(), 1, "sent once, never resent");

    let set = redis::cmd("SET").arg("k").arg("v").clone();
    let () = client.query_idempotent(&set).await.unwrap();
    assert_eq!(*sets.lock().unwrap(), 3, "lost once, resent once");
}

/// A node serving every slot that answers the n-th SET (from 1) as
/// `answer` says; counts the SETs.
async fn set_counting_node(
    answer: impl Fn(usize) -> Answer + Send + Sync + 'static,
) -> (u16, Arc<Mutex<usize>>) {
    let sets = Arc::new(Mutex::new(0usize));
    let port = Arc::new(Mutex::new(0u16));
    let node = {
        let (sets, port) = (Arc::clone(&sets), Arc::clone(&port));
        scripted_node(Arc::new(move |command: &[String]| {
            if is(command, "SET") {
                let mut sets = sets.lock().unwrap();
                *sets += 1;
                return answer(*sets);
            }
            common(command, *port.lock().unwrap())
        }))
        .await
    };
    *port.lock().unwrap() = node;
    (node, sets)
}

/// A node serving every slot that refuses each SET with the next of
/// `refusals` (an error line) and then answers OK; counts the SETs.
async fn refusing_node(refusals: Vec<&'static str>) -> (u16, Arc<Mutex<usize>>) {
    set_counting_node(move |set| {
        Answer::Reply(match refusals.get(set - 1) {
            Some(refusal) => format!("-{refusal}\r\n"),
            None => "+OK\r\n".to_owned(),
        })
    })
    .await
}

#[tokio::test]
async fn tryagain_and_clusterdown_are_waited_out_and_the_write_resent() {
    let (node, sets) = refusing_node(vec![
        "TRYAGAIN Multiple keys request during rehashing of slot",
        "CLUSTERDOWN The cluster is down",
        "TRYAGAIN Multiple keys request during rehashing of slot",
    ])
    .await;
    // Not idempotent: neither refusal ran it, so resending is safe.
    client(node).set("k", "v").await.unwrap();
    assert_eq!(*sets.lock().unwrap(), 4);
}

#[tokio::test]
async fn a_cluster_that_stays_down_fails_within_the_budget() {
    let (node, _) = refusing_node(vec!["CLUSTERDOWN The cluster is down"; 10_000]).await;
    let budget = Duration::from_millis(800);
    let client = FailoverClient::cluster([NodeAddr::new("127.0.0.1", node).unwrap()])
        .retry_budget(budget)
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let error = client.set("k", "v").await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    assert!(error.to_string().contains("ClusterDown"), "{error}");
    assert!(started.elapsed() < budget * 3, "{:?}", started.elapsed());
}
