//! `BENCH_EXPORT=on`: the worker exports its spans over OTLP gRPC to a
//! receiver in the bench process, so every span is encoded and sent as in
//! production. Run once with and once without and compare the rates.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};

/// An OTLP receiver that counts the spans it gets.
#[derive(Default, Clone)]
struct Receiver {
    spans: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(spans, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Where the worker exports to, and how many spans arrived.
pub struct Export {
    pub endpoint: String,
    spans: Arc<AtomicUsize>,
}

impl Export {
    /// Starts the receiver when `BENCH_EXPORT=on`.
    pub async fn start() -> Option<Export> {
        if std::env::var("BENCH_EXPORT").as_deref() != Ok("on") {
            return None;
        }
        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let addr: SocketAddr = listener.local_addr().expect("receiver address");
        let spans = receiver.spans.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(receiver))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        Some(Export {
            endpoint: format!("http://{addr}"),
            spans,
        })
    }

    pub fn spans(&self) -> usize {
        self.spans.load(Ordering::Relaxed)
    }
}
