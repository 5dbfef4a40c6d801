//! The load the operator puts on the API server: its requests by verb and the bytes it sends,
//! counted at the client (a tower layer under every request kube makes). A large installation
//! budgets its control plane by these; the benchmarks print them per run.

use std::task::{Context, Poll};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabel {
    /// The HTTP method: GET (reads and watches), POST, PUT, PATCH, DELETE.
    pub verb: String,
}

/// The counters, shared by the layer and the metrics registry.
#[derive(Clone, Default, Debug)]
pub struct ApiLoad {
    pub requests: Family<VerbLabel, Counter>,
    pub bytes_sent: Family<VerbLabel, Counter>,
}

impl ApiLoad {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "pbx_operator_api_requests",
            "Requests the operator sent to the Kubernetes API server, by HTTP method",
            self.requests.clone(),
        );
        registry.register(
            "pbx_operator_api_request_bytes",
            "Bytes of request bodies the operator sent to the Kubernetes API server, by HTTP method",
            self.bytes_sent.clone(),
        );
    }
}

impl<S> tower::Layer<S> for ApiLoad {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            load: self.clone(),
        }
    }
}

/// A client service whose requests are counted.
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    load: ApiLoad,
}

impl<S, B> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>>,
    B: http_body::Body,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let verb = VerbLabel {
            verb: request.method().as_str().to_string(),
        };
        self.load.requests.get_or_create(&verb).inc();
        // kube sends whole bodies (JSON of a known length); a stream would count as 0.
        let bytes = request.body().size_hint().exact().unwrap_or(0);
        self.load.bytes_sent.get_or_create(&verb).inc_by(bytes);
        self.inner.call(request)
    }
}
