//! Kamailio's JSON-RPC over HTTP (xhttp + jsonrpcs), the way kamcmd and kamcli reach it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::pbx::{PbxError, Registration, Result, SipAnswer};

/// The RPC method a reply answered, for [`BYTES_READ`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct MethodLabel {
    pub method: String,
}

/// Bytes of JSON-RPC replies read by every client of this process, by method (metric
/// `pbx_operator_rpc_bytes_read`): what watching the registrar costs.
pub static BYTES_READ: std::sync::LazyLock<
    prometheus_client::metrics::family::Family<
        MethodLabel,
        prometheus_client::metrics::counter::Counter,
    >,
> = std::sync::LazyLock::new(Default::default);

pub struct RpcClient {
    http: reqwest::Client,
    url: String,
    /// The URL without credentials, for messages.
    shown_url: String,
    timeout: Duration,
    next_id: AtomicU64,
}

impl RpcClient {
    pub fn new(url: &str, timeout: Duration) -> Result<RpcClient> {
        let parsed = reqwest::Url::parse(url).map_err(|e| {
            PbxError::InvalidUrl(format!(
                "the RPC URL is not a URL ({e}); expected e.g. http://kamailio:5071/RPC"
            ))
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(PbxError::InvalidUrl(format!(
                "the RPC URL must be http:// or https://, not {}://",
                parsed.scheme()
            )));
        }
        let mut shown = parsed.clone();
        let _ = shown.set_password(None);
        let _ = shown.set_username("");
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| PbxError::InvalidUrl(format!("cannot build an HTTP client: {e}")))?;
        Ok(RpcClient {
            http,
            url: url.to_string(),
            shown_url: shown.to_string(),
            timeout,
            next_id: AtomicU64::new(1),
        })
    }

    /// Calls `method`; `timeout` overrides the default for calls that wait on the network (NOTIFY).
    pub async fn call(
        &self,
        method: &str,
        params: Value,
        timeout: Option<Duration>,
    ) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = json!({ "jsonrpc": "2.0", "method": method, "params": params, "id": id });
        let response = self
            .http
            .post(&self.url)
            .timeout(timeout.unwrap_or(self.timeout))
            .json(&body)
            .send()
            .await
            .map_err(|e| self.transport_error(method, e))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| self.transport_error(method, e))?;
        BYTES_READ
            .get_or_create(&MethodLabel {
                method: method.to_string(),
            })
            .inc_by(text.len() as u64);
        let value: Value = serde_json::from_str(&text).map_err(|_| PbxError::Rpc {
            method: method.into(),
            detail: format!(
                "HTTP {status} with a body that is not JSON-RPC: {}",
                truncate(&text, 200)
            ),
        })?;
        if let Some(err) = value.get("error") {
            return Err(PbxError::Rpc {
                method: method.into(),
                detail: format!(
                    "{} {}",
                    err.get("code").map(|c| c.to_string()).unwrap_or_default(),
                    err.get("message").and_then(Value::as_str).unwrap_or("")
                )
                .trim()
                .to_string(),
            });
        }
        Ok(value.get("result").cloned().unwrap_or(Value::Null))
    }

    fn transport_error(&self, method: &str, e: reqwest::Error) -> PbxError {
        if e.is_timeout() {
            return PbxError::Rpc {
                method: method.into(),
                detail: "no answer within the RPC timeout".into(),
            };
        }
        // reqwest errors can echo the URL; show ours, without credentials.
        let detail = if e.is_connect() {
            "connection refused or unreachable".to_string()
        } else {
            e.without_url().to_string()
        };
        PbxError::RpcUnreachable {
            url: self.shown_url.clone(),
            detail,
        }
    }

    pub async fn version(&self) -> Result<String> {
        let v = self.call("core.version", json!([]), None).await?;
        Ok(match v {
            Value::String(s) => s.trim().to_string(),
            other => other.to_string(),
        })
    }

    /// Every binding of `domain` in usrloc's `location` table (ul.dump lists every domain).
    pub async fn dump(&self, domain: &str) -> Result<Vec<Registration>> {
        let v = self.call("ul.dump", json!([]), None).await?;
        let mut out = Vec::new();
        collect_aors(&v, Some(domain), &mut out);
        Ok(out)
    }

    pub async fn lookup(&self, aor: &str) -> Result<Vec<Registration>> {
        match self.call("ul.lookup", json!(["location", aor]), None).await {
            Ok(v) => {
                let mut out = Vec::new();
                collect_aors(&v, None, &mut out);
                Ok(out)
            }
            // usrloc answers 404 "AOR not found" for a user without bindings.
            Err(PbxError::Rpc { detail, .. })
                if detail.contains("404") || detail.contains("not found") =>
            {
                Ok(vec![])
            }
            Err(e) => Err(e),
        }
    }

    pub async fn remove(&self, aor: &str) -> Result<()> {
        match self.call("ul.rm", json!(["location", aor]), None).await {
            Ok(_) => Ok(()),
            Err(PbxError::Rpc { detail, .. })
                if detail.contains("404") || detail.contains("not found") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Sends a request through tm and waits for its final reply (`tm.t_uac_wait`, which answers
    /// when the transaction ends and does not pin an RPC worker like `_block`).
    pub async fn uac_wait(
        &self,
        method: &str,
        ruri: &str,
        next_hop: &str,
        socket: &str,
        headers: &str,
        timeout: Duration,
    ) -> Result<SipAnswer> {
        let v = self
            .call(
                "tm.t_uac_wait",
                json!([method, ruri, next_hop, socket, headers]),
                Some(timeout),
            )
            .await?;
        parse_uac_reply(&v).ok_or_else(|| PbxError::Rpc {
            method: "tm.t_uac_wait".into(),
            detail: format!("unexpected reply {}", truncate(&v.to_string(), 200)),
        })
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_string()
    } else {
        format!("{}...", &s[..s.floor_char_boundary(n)])
    }
}

/// tm answers either `[code, "reason", ...]`, `{"code": .., "text": ..}` or `{"Status": "200 OK"}`.
fn parse_uac_reply(v: &Value) -> Option<SipAnswer> {
    match v {
        Value::Array(items) => {
            let code = items.first()?.as_u64()? as u16;
            let reason = items
                .get(1)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            Some(SipAnswer { code, reason })
        }
        Value::Object(map) => {
            if let Some(code) = map.get("code").and_then(Value::as_u64) {
                let reason = map
                    .get("text")
                    .or(map.get("reason"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                return Some(SipAnswer {
                    code: code as u16,
                    reason: reason.to_string(),
                });
            }
            let status = map.get("Status").and_then(Value::as_str)?;
            let (code, reason) = status.split_once(' ').unwrap_or((status, ""));
            Some(SipAnswer {
                code: code.parse().ok()?,
                reason: reason.to_string(),
            })
        }
        Value::String(s) => {
            let (code, reason) = s.split_once(' ').unwrap_or((s, ""));
            Some(SipAnswer {
                code: code.parse().ok()?,
                reason: reason.to_string(),
            })
        }
        _ => None,
    }
}

/// Walks ul.dump / ul.lookup output: objects with an `AoR` and a `Contacts` list of `{"Contact": {...}}`.
/// With `domain`, only AoRs of that domain (or without one) are kept.
fn collect_aors(v: &Value, domain: Option<&str>, out: &mut Vec<Registration>) {
    match v {
        Value::Object(map) => {
            if let (Some(aor), Some(Value::Array(contacts))) =
                (map.get("AoR").and_then(Value::as_str), map.get("Contacts"))
            {
                let (extension, aor_domain) = aor.split_once('@').unwrap_or((aor, ""));
                if domain
                    .is_some_and(|d| !aor_domain.is_empty() && !aor_domain.eq_ignore_ascii_case(d))
                {
                    return;
                }
                let extension = extension.to_string();
                for c in contacts {
                    let c = c.get("Contact").unwrap_or(c);
                    if let Some(r) = registration(&extension, c) {
                        out.push(r);
                    }
                }
                return;
            }
            for child in map.values() {
                collect_aors(child, domain, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| collect_aors(i, domain, out)),
        _ => {}
    }
}

fn registration(extension: &str, c: &Value) -> Option<Registration> {
    let text = |k: &str| {
        c.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && *s != "[not set]")
            .map(str::to_string)
    };
    let int = |k: &str| {
        c.get(k).and_then(|v| {
            v.as_i64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        })
    };
    Some(Registration {
        extension: extension.to_string(),
        contact: text("Address")?,
        received: text("Received"),
        socket: text("Socket"),
        user_agent: text("User-Agent").unwrap_or_default(),
        call_id: text("Call-ID").unwrap_or_default(),
        last_modified: int("Last-Modified").unwrap_or(0),
        expires: int("Expires").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ul_dump() {
        let dump = json!({"Domains": [{"Domain": {"Domain": "location", "Size": 1024, "AoRs": [
            {"Info": {"AoR": "201@pbx.test", "HashID": 1, "Contacts": [
                {"Contact": {"Address": "sip:201@127.0.0.1:5070", "Expires": 3599, "Call-ID": "abc",
                 "User-Agent": "Yealink SIP-T46S 66.86.0.15", "Received": "[not set]",
                 "Socket": "udp:127.0.0.1:5060", "Last-Modified": 1763769600}}]}}]}}]});
        let regs = {
            let mut v = Vec::new();
            collect_aors(&dump, Some("pbx.test"), &mut v);
            v
        };
        let mut other = Vec::new();
        collect_aors(&dump, Some("other.test"), &mut other);
        assert!(
            other.is_empty(),
            "another tenant's registrations are not ours"
        );
        assert_eq!(regs.len(), 1);
        assert_eq!(regs[0].extension, "201");
        assert_eq!(regs[0].received, None);
        assert_eq!(regs[0].socket.as_deref(), Some("udp:127.0.0.1:5060"));
        assert_eq!(regs[0].last_modified, 1763769600);
    }

    #[test]
    fn parses_uac_replies() {
        assert_eq!(
            parse_uac_reply(&json!([200, "OK", "sip:x"])).unwrap().code,
            200
        );
        assert_eq!(
            parse_uac_reply(&json!({"code": 408, "text": "Request Timeout"}))
                .unwrap()
                .reason,
            "Request Timeout"
        );
        assert_eq!(
            parse_uac_reply(&json!({"Status": "486 Busy Here"}))
                .unwrap()
                .code,
            486
        );
        assert!(parse_uac_reply(&json!(null)).is_none());
    }
}
