//! PBX backends per PbxConnection, built from the connection's spec and Secrets and kept while
//! they stay the same. A changed Secret yields a new fingerprint, hence a new backend: no restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use super::Error;
use crate::api::{PbxConnection, SecretKeyRef, connection::Backend};
use crate::pbx::kamailio::{Kamailio, KamailioConfig};

pub struct Backends {
    cache: Mutex<HashMap<(String, String), Cached>>,
}

struct Cached {
    fingerprint: String,
    backend: Arc<Kamailio>,
}

impl Default for Backends {
    fn default() -> Self {
        Backends {
            cache: Mutex::new(HashMap::new()),
        }
    }
}

/// Parses the Go-style durations the CRDs accept (`30s`, `5m`, `1h30m`, `250ms`).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(n), 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(n), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(n * 60), 1)
        } else if rest.starts_with('h') {
            (Duration::from_secs(n * 3600), 1)
        } else {
            return None;
        };
        total += unit;
        rest = &rest[len..];
    }
    (!text.is_empty()).then_some(total)
}

pub(crate) async fn secret_value(
    client: &Client,
    namespace: &str,
    r: &SecretKeyRef,
) -> Result<String, Error> {
    Ok(secret_value_versioned(client, namespace, r).await?.0)
}

/// A Secret key's text and the Secret's resourceVersion (which changes with its data, and is
/// not secret: plans pin it instead of the value).
pub(crate) async fn secret_value_versioned(
    client: &Client,
    namespace: &str,
    r: &SecretKeyRef,
) -> Result<(String, String), Error> {
    let (bytes, version) = secret_bytes_versioned(client, namespace, r).await?;
    let text = String::from_utf8(bytes).map_err(|_| Error::SecretMissing {
        namespace: namespace.to_string(),
        name: r.name.clone(),
        key: r.key.clone(),
        detail: "the value is not UTF-8 text".into(),
    })?;
    Ok((text.trim().to_string(), version))
}

/// A Secret key's bytes as stored (a CSV, say), read with `get` on that one Secret.
pub(crate) async fn secret_bytes(
    client: &Client,
    namespace: &str,
    r: &SecretKeyRef,
) -> Result<Vec<u8>, Error> {
    Ok(secret_bytes_versioned(client, namespace, r).await?.0)
}

async fn secret_bytes_versioned(
    client: &Client,
    namespace: &str,
    r: &SecretKeyRef,
) -> Result<(Vec<u8>, String), Error> {
    let missing = |detail: &str| Error::SecretMissing {
        namespace: namespace.to_string(),
        name: r.name.clone(),
        key: r.key.clone(),
        detail: detail.to_string(),
    };
    let secret = match Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(&r.name)
        .await
    {
        Ok(Some(s)) => s,
        Ok(None) => return Err(missing("the Secret does not exist")),
        Err(kube::Error::Api(s)) if s.code == 403 => {
            return Err(missing("the operator may not read it (RBAC)"));
        }
        Err(e) => return Err(Error::Kube(e)),
    };
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(&r.key))
                .map(|s| s.clone().into_bytes())
        })
        .ok_or_else(|| missing("the Secret has no such key"))?;
    let version = secret.metadata.resource_version.clone().unwrap_or_default();
    Ok((bytes, version))
}

/// The Kamailio settings a connection resolves to, with its Secrets read.
pub async fn config_for(client: &Client, conn: &PbxConnection) -> Result<KamailioConfig, Error> {
    let ns = conn.namespace().unwrap_or_default();
    let Backend::Kamailio = conn.spec.backend;
    let database_url = secret_value(client, &ns, &conn.spec.database.url_secret_ref).await?;
    let rpc_url = secret_value(client, &ns, &conn.spec.rpc.url_secret_ref).await?;
    let mut config = KamailioConfig::new(database_url, rpc_url, conn.spec.domain.clone());
    if let Some(n) = conn.spec.database.max_connections {
        config.max_connections = n;
    }
    if let Some(t) = conn.spec.rpc.timeout.as_deref().and_then(parse_duration) {
        config.rpc_timeout = t;
    }
    Ok(config)
}

pub(crate) fn fingerprint(config: &KamailioConfig) -> String {
    let mut h = Sha256::new();
    for part in [&config.database_url, &config.rpc_url, &config.domain] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.update(config.max_connections.to_le_bytes());
    h.update(config.rpc_timeout.as_millis().to_le_bytes());
    hex::encode(h.finalize())
}

impl Backends {
    /// The backend for a connection, connecting (or reconnecting after a Secret change) as needed.
    pub async fn get(&self, client: &Client, conn: &PbxConnection) -> Result<Arc<Kamailio>, Error> {
        let config = config_for(client, conn).await?;
        let key = (conn.namespace().unwrap_or_default(), conn.name_any());
        let fp = fingerprint(&config);
        if let Some(c) = self
            .cache
            .lock()
            .await
            .get(&key)
            .filter(|c| c.fingerprint == fp)
        {
            return Ok(c.backend.clone());
        }
        let backend = Arc::new(Kamailio::connect(config).await?);
        self.cache.lock().await.insert(
            key,
            Cached {
                fingerprint: fp,
                backend: backend.clone(),
            },
        );
        Ok(backend)
    }

    /// Looks up a connection by name in a namespace and returns its backend.
    pub async fn by_name(
        &self,
        client: &Client,
        namespace: &str,
        name: &str,
    ) -> Result<(PbxConnection, Arc<Kamailio>), Error> {
        let conn = Api::<PbxConnection>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await?
            .ok_or_else(|| Error::ConnectionMissing {
                namespace: namespace.into(),
                name: name.into(),
            })?;
        let backend = self.get(client, &conn).await?;
        Ok((conn, backend))
    }

    pub async fn forget(&self, namespace: &str, name: &str) {
        self.cache
            .lock()
            .await
            .remove(&(namespace.to_string(), name.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("5d"), None);
    }
}
