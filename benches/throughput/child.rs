//! The worker as a separate process (the release binary cargo built next to
//! this bench), so its peak RSS is its own: started per measurement, probed
//! for readiness and counts on its metrics port, stopped with SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Target;

const WORKER: &str = env!("CARGO_BIN_EXE_worker-iot-core");

/// The worker binary another build made, drained beside this one's in
/// every round (`BENCH_BASELINE_WORKER`): a change is measured against the
/// code before it in the same run, not against figures of another day.
pub fn baseline_worker() -> Option<PathBuf> {
    std::env::var_os("BENCH_BASELINE_WORKER").map(PathBuf::from)
}

/// Drains tagged `baseline` run [`baseline_worker`]; every other, this build's.
fn binary(tag: &str) -> PathBuf {
    match (tag, baseline_worker()) {
        ("baseline", Some(path)) => path,
        _ => PathBuf::from(WORKER),
    }
}

/// Environment passed to the worker unchanged, so the same bench measures
/// the worker under other settings: every `BATCH_*` variable, and these.
const PASS_THROUGH_PREFIXES: &[&str] = &["BATCH_"];
const PASS_THROUGH: &[&str] = &[
    "RABBITMQ_PREFETCH_COUNT",
    "DATABASE_MAX_CONNECTIONS",
    "OUTBOX_RELAY",
    "RUST_LOG",
    "LOG_FORMAT",
];

/// The pass-through settings present in this environment, sorted.
pub fn passed_through() -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(key, _)| {
            PASS_THROUGH.contains(&key.as_str()) || PASS_THROUGH_PREFIXES.iter().any(|p| key.starts_with(p))
        })
        .collect();
    vars.sort();
    vars
}

/// `SETTINGS_FILE` naming the repository's `_storage/settings.json` (what
/// `docker compose up` and a bare start read) when `BENCH_SETTINGS=shipped`;
/// the variables the bench sets still win over the file.
pub fn shipped_settings() -> Option<(&'static str, String)> {
    match crate::support::env_or("BENCH_SETTINGS", "defaults").as_str() {
        "defaults" => None,
        "shipped" => Some((
            "SETTINGS_FILE",
            format!("{}/_storage/settings.json", env!("CARGO_MANIFEST_DIR")),
        )),
        other => panic!("BENCH_SETTINGS={other:?}: expected defaults or shipped"),
    }
}

/// Deliveries the worker has settled (acked after commit or divert), by
/// outcome, from `iot_deliveries_total`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub processed: u64,
    pub duplicate: u64,
    pub omitted: u64,
    pub retried: u64,
    pub parked: u64,
    /// Deliveries received and not acked yet.
    pub in_flight: u64,
}

impl Counts {
    /// Deliveries settled for good (not sent to a delayed retry).
    pub fn done(&self) -> u64 {
        self.processed + self.duplicate + self.omitted + self.parked
    }

    fn parse(text: &str) -> Option<Counts> {
        let mut counts = Counts::default();
        let mut seen = false;
        for line in text.lines() {
            if let Some(value) = line.strip_prefix("iot_deliveries_in_flight ") {
                counts.in_flight = value.trim().parse::<f64>().ok()? as u64;
                continue;
            }
            let Some(rest) = line.strip_prefix("iot_deliveries_total{") else {
                continue;
            };
            let (labels, value) = rest.split_once("} ")?;
            let value: u64 = value.trim().parse().ok()?;
            let outcome = labels.split(',').find_map(|l| l.strip_prefix("outcome=\""))?;
            let slot = match outcome.trim_end_matches('"') {
                "processed" => &mut counts.processed,
                "duplicate" => &mut counts.duplicate,
                "omitted" => &mut counts.omitted,
                "retried" => &mut counts.retried,
                "parked" => &mut counts.parked,
                _ => continue,
            };
            *slot += value;
            seen = true;
        }
        seen.then_some(counts)
    }
}

pub struct WorkerProcess {
    child: tokio::process::Child,
    pid: u32,
    metrics: SocketAddr,
    log: PathBuf,
}

impl WorkerProcess {
    /// Starts the worker on `target`'s queue and waits until it consumes.
    pub async fn start(bench: &crate::Bench, target: &Target, tag: &str) -> WorkerProcess {
        WorkerProcess::start_on(bench, &bench.database_url, target, tag).await
    }

    /// [`WorkerProcess::start`] on the database at `database_url`.
    pub async fn start_on(bench: &crate::Bench, database_url: &str, target: &Target, tag: &str) -> WorkerProcess {
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = bench.dir.join(format!("worker-{}-{tag}.log", target.queue_type));
        let output = std::fs::File::create(&log).expect("worker log file");
        let endpoint = bench.export.as_ref().map_or("", |export| export.endpoint.as_str());
        let child = tokio::process::Command::new(binary(tag))
            // No settings file (unless `BENCH_SETTINGS=shipped`): the
            // worker's defaults, the variables below and the pass-through
            // ones.
            .current_dir(&bench.dir)
            .env_clear()
            .envs(shipped_settings())
            .envs(passed_through())
            .env("AMQP_URL", &bench.amqp_url)
            .env("DATABASE_URL", database_url)
            .env("RABBITMQ_LOCAL_QUEUE_NAME", target.topology.queue())
            .env("TOPOLOGY_FILE", &target.file)
            .env("METRICS_ADDR", metrics.to_string())
            // The drain's check counts the parked messages in Q.dlq, and the
            // lot keeps one row per message id (the poison mix repeats
            // bodies): the keeper, measured in its own section, stays off.
            .env("PARKING_KEEPER", "off")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            .stdout(output.try_clone().expect("log file handle"))
            .stderr(output)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the worker binary");
        let pid = child.id().expect("a running child has a pid");
        let mut worker = WorkerProcess {
            child,
            pid,
            metrics,
            log,
        };
        worker.wait_ready().await;
        worker
    }

    async fn wait_ready(&mut self) {
        let started = Instant::now();
        while !matches!(worker_iot_core::probe_ready(self.metrics).await, Ok(Ok(()))) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the worker exited ({status}) before it was ready:\n{}", self.log_tail());
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the worker was not ready within 60 s:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The settled counts from `/metrics`: zero before the first delivery
    /// settles (a counter appears with its first increment).
    pub async fn counts(&self) -> Counts {
        let text = http_get(self.metrics, "/metrics").await.unwrap_or_default();
        assert!(
            text.contains("iot_ready"),
            "no metrics from the worker:\n{text}\n{}",
            self.log_tail()
        );
        Counts::parse(&text).unwrap_or_default()
    }

    /// Peak resident set size of the worker process so far (VmHWM), MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).expect("/proc/<pid>/status");
        let kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status");
        kib / 1024.0
    }

    /// The last lines of the worker's output, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 30)
    }

    /// SIGTERM, then waits for a clean exit (SIGKILL after 30 s).
    pub async fn stop(mut self) {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        let exited = if sent {
            tokio::time::timeout(Duration::from_secs(30), self.child.wait())
                .await
                .ok()
        } else {
            None
        };
        match exited {
            Some(Ok(status)) if status.success() => {}
            other => {
                self.child.kill().await.ok();
                panic!("the worker did not stop cleanly ({other:?}):\n{}", self.log_tail());
            }
        }
    }
}

/// A port free right now (the worker binds it a moment later).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("bound address").port()
}

async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
