//! The topology files tests start with. Most tests take
//! [`TopologyFile::fast`] or [`TopologyFile::outbox`]; a test that needs
//! another queue type, other retries or another delivery limit changes
//! those on [`TopologyFile::classic`], so each file says only how it
//! differs.

/// A topology file, as the worker reads it from `TOPOLOGY_FILE`.
#[derive(Debug, Clone)]
pub struct TopologyFile {
    queue_type: String,
    delivery_limit: u32,
    delays: Vec<String>,
    max_attempts: u32,
    /// `None`: the worker's default.
    in_process_attempts: Option<u32>,
    /// Whether `Q` is bound to `amq.topic` with `<Q>.#`.
    bound: bool,
    /// More TOML (device routes, command topics), with `{Q}` standing for
    /// the main queue's name.
    extra: String,
}

impl TopologyFile {
    /// Classic queues, `delivery_limit` 3, and millisecond retries (50 ms,
    /// 100 ms) so that retry paths run in seconds: 3 attempts, with the
    /// default in-process attempts. No bindings.
    pub fn classic() -> TopologyFile {
        TopologyFile {
            queue_type: "classic".into(),
            delivery_limit: 3,
            delays: vec!["50ms".into(), "100ms".into()],
            max_attempts: 3,
            in_process_attempts: None,
            bound: false,
            extra: String::new(),
        }
    }

    /// [`TopologyFile::classic`] with `Q` bound to `amq.topic` by
    /// `<Q>.#`, a binding private to the test.
    pub fn fast() -> TopologyFile {
        TopologyFile {
            bound: true,
            ..TopologyFile::classic()
        }
    }

    /// [`TopologyFile::classic`] with one retry, for tests of the outbox
    /// and its relay.
    pub fn outbox() -> TopologyFile {
        TopologyFile::classic().delays(&["50ms"])
    }

    /// `"classic"` or `"quorum"`.
    pub fn queue_type(mut self, queue_type: &str) -> TopologyFile {
        queue_type.clone_into(&mut self.queue_type);
        self
    }

    pub fn delivery_limit(mut self, limit: u32) -> TopologyFile {
        self.delivery_limit = limit;
        self
    }

    /// The retry queues' delays, such as `["50ms", "1s"]`.
    pub fn delays(mut self, delays: &[&str]) -> TopologyFile {
        self.delays = delays.iter().map(|d| (*d).to_owned()).collect();
        self
    }

    pub fn max_attempts(mut self, attempts: u32) -> TopologyFile {
        self.max_attempts = attempts;
        self
    }

    pub fn in_process_attempts(mut self, attempts: u32) -> TopologyFile {
        self.in_process_attempts = Some(attempts);
        self
    }

    /// Appends `toml` to the file; `{Q}` in it is the main queue's name
    /// (a topic prefix no other test uses).
    pub fn extra(mut self, toml: &str) -> TopologyFile {
        self.extra.push_str(toml);
        self
    }

    /// The file's TOML, for main queue `queue`.
    pub fn toml(&self, queue: &str) -> String {
        let delays: Vec<String> = self.delays.iter().map(|d| format!("{d:?}")).collect();
        let mut toml = format!(
            "queue_type = {:?}\ndelivery_limit = {}\n[retry]\ndelays = [{}]\nmax_attempts = {}\n",
            self.queue_type,
            self.delivery_limit,
            delays.join(", "),
            self.max_attempts,
        );
        if let Some(attempts) = self.in_process_attempts {
            toml.push_str(&format!("in_process_attempts = {attempts}\n"));
        }
        if self.bound {
            toml.push_str(&format!(
                "[[bindings]]\nexchange = \"amq.topic\"\nrouting_key = \"{queue}.#\"\n"
            ));
        }
        toml.push_str(&self.extra.replace("{Q}", queue));
        toml
    }
}
