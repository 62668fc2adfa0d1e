//! The start-up banner: the worker's name in large letters, as the
//! platform's services print theirs.

/// The banner, followed by the version line.
pub fn banner() -> String {
    format!(
        "{ART}\n  v{} - RabbitMQ -> PostgreSQL, ack after commit\n",
        env!("CARGO_PKG_VERSION")
    )
}

const ART: &str = r"                    _                  _       _
__      _____  _ __| | _____ _ __     (_) ___ | |_       ___ ___  _ __ ___
\ \ /\ / / _ \| '__| |/ / _ \ '__|____| |/ _ \| __|____ / __/ _ \| '__/ _ \
 \ V  V / (_) | |  |   <  __/ | |_____| | (_) | ||_____| (_| (_) | | |  __/
  \_/\_/ \___/|_|  |_|\_\___|_|       |_|\___/ \__|     \___\___/|_|  \___|";
