//! A real browser for the console's tests: Debian's `chromium`, headless,
//! driven through `chromedriver` (both installed by `.ci/run`), with a
//! fresh profile per browser; and the `console` binary on a free port.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{TestEnv, WorkerProcess, wait_for};

pub const CONSOLE: &str = env!("CARGO_BIN_EXE_console");
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const START: Duration = Duration::from_secs(30);

/// A headless chromium session.
pub struct Browser {
    pub client: Client,
    driver: tokio::process::Child,
    profile: PathBuf,
}

/// A free loopback port (bound, then let go).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

impl Browser {
    /// Starts chromedriver and a headless chromium with a new profile in
    /// `env`'s directory.
    pub async fn start(env: &TestEnv) -> Browser {
        assert!(
            std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
            "the console's browser tests need Debian's chromium and chromium-driver: \
             apt-get install chromium chromium-driver (.ci/run does)"
        );
        let port = free_port();
        let driver = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        wait_for("chromedriver to listen", START, || async move {
            TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ())
        })
        .await;
        let profile = env.dir.join(format!("chromium-{port}"));
        let options = json!({
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", format!("--user-data-dir={}", profile.display()),
            ],
        });
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("goog:chromeOptions".into(), options);
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a chromium session");
        Browser {
            client,
            driver,
            profile,
        }
    }

    /// The text of the first element matching `css`, once it is there.
    pub async fn text(&self, css: &str) -> String {
        let found = self
            .client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(css))
            .await;
        match found {
            Ok(element) => element.text().await.expect("element text"),
            Err(e) => panic!("no {css} on {:?}: {e}", self.client.current_url().await.ok()),
        }
    }

    /// Clicks the first element matching `css`.
    pub async fn click(&self, css: &str) {
        let element = self
            .client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} to click: {e}"));
        element.click().await.unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// How many elements match `css` now.
    pub async fn count(&self, css: &str) -> usize {
        self.client.find_all(Locator::Css(css)).await.expect("find").len()
    }

    /// Runs `script` in the page and returns its value.
    pub async fn run(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.expect("run a script")
    }

    /// The page's load as Navigation Timing measured it: from the start
    /// of navigation to the end of the load event, in milliseconds.
    pub async fn load_ms(&self) -> f64 {
        let script = "const n = performance.getEntriesByType('navigation')[0]; return n.loadEventEnd - n.startTime;";
        self.run(script).await.as_f64().expect("a navigation entry")
    }

    /// Saves a screenshot of the page as `name`.png in
    /// `target/console-screenshots/`, and in `docs/images/` when
    /// `WIC_UPDATE_SCREENSHOTS=1` (how the committed ones were made).
    pub async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let mut dirs = vec![root.join("target/console-screenshots")];
        if std::env::var("WIC_UPDATE_SCREENSHOTS").as_deref() == Ok("1") {
            dirs.push(root.join("docs/images"));
        }
        for dir in dirs {
            std::fs::create_dir_all(&dir).expect("screenshot dir");
            std::fs::write(dir.join(format!("console-{name}.png")), &png).expect("write screenshot");
        }
    }

    pub async fn close(mut self) {
        self.client.close().await.ok();
        self.driver.kill().await.ok();
        std::fs::remove_dir_all(&self.profile).ok();
    }
}

/// The console binary, serving this test's lot.
pub struct ConsoleProcess {
    pub process: WorkerProcess,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub addr: String,
}

impl TestEnv {
    /// Starts `console` on a free loopback port with `extra` settings
    /// (tokens, `JAEGER_UI_URL`), and waits until it listens.
    pub async fn spawn_console(&self, extra: &[(&str, &str)], tag: &str) -> ConsoleProcess {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut settings = vec![("CONSOLE_ADDR", addr.as_str()), ("RUST_LOG", "info")];
        settings.extend_from_slice(extra);
        let process = self.spawn_binary(CONSOLE, &self.settings_json(), &settings, tag);
        let console = ConsoleProcess {
            url: format!("http://{addr}"),
            addr,
            process,
        };
        let out = console.process.stdout.clone();
        wait_for("the console to listen", START, || {
            let out = out.clone();
            async move {
                std::fs::read_to_string(out)
                    .ok()?
                    .contains("console listening")
                    .then_some(())
            }
        })
        .await;
        console
    }
}

/// A raw HTTP/1.1 exchange, for what a browser would not send (no
/// `Origin`, a bearer token): status, head and body.
pub async fn http(addr: &str, request_head: &str, body: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the console");
    let host = if request_head.to_ascii_lowercase().contains("\r\nhost:") {
        String::new()
    } else {
        format!("\r\nHost: {addr}")
    };
    let request = format!(
        "{request_head}{host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read the answer");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, head.to_owned(), body.to_owned())
}
