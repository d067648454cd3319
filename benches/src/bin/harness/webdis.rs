//! webdis (Debian's package: a C gateway from HTTP to Redis, with no
//! authentication and no tenants) as the `http` scenario's peer, started
//! against the same Redis when its binary is on `PATH`.

use std::error::Error;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::process::{Child, Command};

/// How long webdis may take to listen.
const START_DEADLINE: Duration = Duration::from_secs(10);

/// A running webdis; dropping it kills the process.
pub(crate) struct Webdis {
    pub(crate) addr: SocketAddr,
    process: Child,
}

impl Webdis {
    /// Its process id, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.process.id()
    }

    /// Starts webdis in `dir` on a free loopback port, serving `redis`;
    /// `None` when there is no `webdis` binary.
    pub(crate) async fn start(
        dir: &Path,
        redis: SocketAddr,
    ) -> Result<Option<Self>, Box<dyn Error>> {
        let Some(binary) = find_on_path("webdis") else {
            println!("http: no webdis on PATH (apt-get install webdis): its variants are left out");
            return Ok(None);
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // Its defaults, but in the foreground, quiet, and on these ports.
        let config = json!({
            "redis_host": redis.ip().to_string(),
            "redis_port": redis.port(),
            "redis_auth": null,
            "http_host": "127.0.0.1",
            "http_port": port,
            "threads": 2,
            "daemonize": false,
            "database": 0,
            "verbosity": 0,
            "logfile": dir.join("webdis.log"),
        });
        let path = dir.join("webdis.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
        let process = Command::new(binary)
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let started = Instant::now();
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if started.elapsed() > START_DEADLINE {
                return Err(
                    format!("webdis did not listen on {addr} within {START_DEADLINE:?}").into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Some(Self { addr, process }))
    }
}

fn find_on_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}
