//! PBX backends per PbxConnection, built from the connection's spec and Secrets and kept while
//! they stay the same. A changed Secret yields a new fingerprint, hence a new backend: no restart.
//! Also one NOTIFY rate limit per PbxConnection (`spec.rateLimits.notifiesPerSecond`), shared by
//! every PhoneRestart on it and kept across backend reconnects.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use super::Error;
use crate::api::{Lock, PbxConnection, SecretField, SecretKeyRef, connection::Backend};
use crate::pbx::UserField;
use crate::pbx::kamailio::{Kamailio, KamailioConfig};
use crate::plan::users::{FieldIntent, Wanted};

pub struct Backends {
    cache: Mutex<HashMap<(String, String), Cached>>,
    notify_limits: std::sync::Mutex<HashMap<(String, String), Arc<RateLimit>>>,
}

/// At most `per_second` events per second, evenly spaced, for every caller together: each
/// [`RateLimit::acquire`] reserves the next free slot (1/per_second after the one before) and
/// sleeps until it. No burst: any one-second window holds at most `per_second` + 1 slots.
pub struct RateLimit {
    /// Events per second, and when the next slot is free.
    state: std::sync::Mutex<(u32, tokio::time::Instant)>,
}

impl RateLimit {
    pub fn new(per_second: u32) -> RateLimit {
        RateLimit {
            state: std::sync::Mutex::new((per_second.max(1), tokio::time::Instant::now())),
        }
    }

    /// Changes the rate for every holder at once, from the next slot on.
    pub fn set_per_second(&self, per_second: u32) {
        self.state.lock().expect("not poisoned").0 = per_second.max(1);
    }

    /// Waits for this caller's slot.
    pub async fn acquire(&self) {
        let slot = {
            let mut state = self.state.lock().expect("not poisoned");
            let (per_second, next) = *state;
            let slot = next.max(tokio::time::Instant::now());
            state.1 = slot + Duration::from_secs_f64(1.0 / f64::from(per_second));
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

struct Cached {
    fingerprint: String,
    backend: Arc<Kamailio>,
}

impl Default for Backends {
    fn default() -> Self {
        Backends {
            cache: Mutex::new(HashMap::new()),
            notify_limits: std::sync::Mutex::new(HashMap::new()),
        }
    }
}

/// The label by which a Secret's owner lets changes (BulkUserChange `spec.source.csv` and
/// `spec.fields.*.valueFrom`) name it. Whoever may write the Secret sets it: that is the consent.
pub const USABLE_BY_CHANGES: &str = "pbx-operator.io/usable-by-changes";

/// A Secret key's text, trimmed, for the operator's own use (a PbxConnection's Secrets, which
/// admins create).
pub(crate) async fn secret_value(
    client: &Client,
    namespace: &str,
    r: &SecretKeyRef,
) -> Result<String, Error> {
    let (bytes, _) = secret_bytes_versioned(client, namespace, r).await?;
    text(bytes, namespace, r)
}

/// A Secret key's text, trimmed, and its resourceVersion, for a change that names it in
/// `field`: see [`change_secret_bytes`].
pub(crate) async fn change_secret_value_versioned(
    client: &Client,
    namespace: &str,
    r: &SecretKeyRef,
    field: &str,
) -> Result<(String, String), Error> {
    let (bytes, version) = change_secret_bytes_versioned(client, namespace, r, field).await?;
    Ok((text(bytes, namespace, r)?, version))
}

fn text(bytes: Vec<u8>, namespace: &str, r: &SecretKeyRef) -> Result<String, Error> {
    let text = String::from_utf8(bytes).map_err(|_| Error::SecretMissing {
        namespace: namespace.to_string(),
        name: r.name.clone(),
        key: r.key.clone(),
        detail: "the value is not UTF-8 text".into(),
    })?;
    Ok(text.trim().to_string())
}

/// A Secret key's bytes for a change that names it in `field`. The operator can read every
/// Secret of the namespace and the change's author may not: it is never their deputy, so the
/// Secret is used only when it carries [`USABLE_BY_CHANGES`]` = "true"`. Its metadata is
/// checked first; without the label the data is never fetched.
pub(crate) async fn change_secret_bytes(
    client: &Client,
    namespace: &str,
    r: &SecretKeyRef,
    field: &str,
) -> Result<Vec<u8>, Error> {
    Ok(change_secret_bytes_versioned(client, namespace, r, field)
        .await?
        .0)
}

async fn change_secret_bytes_versioned(
    client: &Client,
    namespace: &str,
    r: &SecretKeyRef,
    field: &str,
) -> Result<(Vec<u8>, String), Error> {
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    let meta = match api.get_metadata_opt(&r.name).await {
        Ok(m) => m,
        Err(kube::Error::Api(s)) if s.code == 403 => {
            return Err(Error::SecretMissing {
                namespace: namespace.to_string(),
                name: r.name.clone(),
                key: r.key.clone(),
                detail: "the operator may not read it (RBAC)".into(),
            });
        }
        Err(e) => return Err(Error::Kube(e)),
    };
    // A missing Secret gets the same answer, so a change cannot probe which Secrets exist.
    let usable =
        meta.is_some_and(|m| m.labels().get(USABLE_BY_CHANGES).map(String::as_str) == Some("true"));
    if !usable {
        return Err(Error::SecretNotUsable {
            namespace: namespace.to_string(),
            name: r.name.clone(),
            key: r.key.clone(),
            field: field.to_string(),
        });
    }
    secret_bytes_versioned(client, namespace, r).await
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
    if let Some(t) = conn
        .spec
        .rpc
        .timeout
        .as_deref()
        .and_then(crate::api::parse_duration)
    {
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

    /// The NOTIFY limit of a connection (`spec.rateLimits.notifiesPerSecond`), one per
    /// PbxConnection, so that restarts running at once share it; None when it sets none. A
    /// changed rate is applied to the same limit, so restarts already holding it follow too.
    pub fn notify_limit(&self, conn: &PbxConnection) -> Option<Arc<RateLimit>> {
        let key = (conn.namespace().unwrap_or_default(), conn.name_any());
        let wanted = conn
            .spec
            .rate_limits
            .as_ref()
            .and_then(|r| r.notifies_per_second);
        let mut limits = self.notify_limits.lock().expect("not poisoned");
        let Some(per_second) = wanted else {
            limits.remove(&key);
            return None;
        };
        let limit = limits
            .entry(key)
            .and_modify(|l| l.set_per_second(per_second))
            .or_insert_with(|| Arc::new(RateLimit::new(per_second)));
        Some(limit.clone())
    }

    /// A PbxConnection gone (deleted, or moved to another shard): its backend leaves the cache
    /// and its database pool is closed (idle connections at once, the others as runs still
    /// holding them finish); its NOTIFY limit goes too. Returns whether it had a backend.
    pub async fn close(&self, namespace: &str, name: &str) -> bool {
        let key = (namespace.to_string(), name.to_string());
        self.notify_limits
            .lock()
            .expect("not poisoned")
            .remove(&key);
        let cached = self.cache.lock().await.remove(&key);
        match cached {
            Some(c) => {
                tokio::spawn(async move { c.backend.close().await });
                true
            }
            None => false,
        }
    }

    /// The connections (namespace, name) with a backend in the cache.
    pub async fn cached(&self) -> Vec<(String, String)> {
        self.cache.lock().await.keys().cloned().collect()
    }

    /// Drops the cached backend (not the NOTIFY limit: restarts may be waiting on its slots).
    pub async fn forget(&self, namespace: &str, name: &str) {
        self.cache
            .lock()
            .await
            .remove(&(namespace.to_string(), name.to_string()));
    }
}

/// The connection's SMTP relay, with its credentials from the connection's Secret; None when
/// the connection has no (usable) `spec.smtp`.
pub(crate) async fn mailer(
    client: &Client,
    namespace: &str,
    conn: &crate::api::PbxConnection,
) -> Option<crate::mail::Mailer> {
    let smtp = conn.spec.smtp.as_ref()?;
    let credentials = match &smtp.credentials_secret {
        Some(name) => {
            let key = |key: &str| crate::api::SecretKeyRef {
                name: name.clone(),
                key: key.into(),
            };
            let user = secret_value(client, namespace, &key("username"))
                .await
                .ok()?;
            let pass = secret_value(client, namespace, &key("password"))
                .await
                .ok()?;
            Some((user, crate::pbx::Secret::new(pass)))
        }
        None => None,
    };
    match crate::mail::Mailer::new(smtp, credentials) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(error = %e, "SMTP settings unusable");
            None
        }
    }
}

/// The secret fields of a BulkUserChange, each read from its (opted-in) Secret with the
/// reference (name, key, resourceVersion) that pins it in the plan hash: a Secret changed after
/// validation is a new request.
pub async fn secret_fields(
    client: &Client,
    namespace: &str,
    fields: &crate::api::UserFields,
) -> Result<Vec<FieldIntent>, Error> {
    let mut out = Vec::new();
    for (field, secret) in [
        (UserField::VoicemailPin, &fields.voicemail_pin),
        (UserField::Password, &fields.password),
    ] {
        let Some(SecretField {
            value_from: Some(from),
            lock,
            ..
        }) = secret
        else {
            continue;
        };
        let named_in = format!("spec.fields.{}.valueFrom.secretKeyRef", field.name());
        let r = &from.secret_key_ref;
        let (value, version) =
            change_secret_value_versioned(client, namespace, r, &named_in).await?;
        let reference = format!("Secret {} key {} resourceVersion {version}", r.name, r.key);
        out.push(FieldIntent {
            field,
            wanted: Wanted::Secret(crate::pbx::Secret::with_reference(value, reference)),
            open: *lock == Lock::Open,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_rate_limit_spaces_all_its_callers() {
        let limit = Arc::new(RateLimit::new(50));
        let start = tokio::time::Instant::now();
        let caller = |limit: Arc<RateLimit>| async move {
            for _ in 0..10 {
                limit.acquire().await;
            }
        };
        tokio::join!(caller(limit.clone()), caller(limit.clone()));
        // 20 slots 20 ms apart, the first at once: 380 ms at least.
        assert!(
            start.elapsed() >= Duration::from_millis(380),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn one_notify_limit_per_connection_follows_its_spec() {
        let conn = |rate: Option<u32>| -> PbxConnection {
            let mut spec = serde_json::json!({
                "domain": "pbx.test",
                "database": { "urlSecretRef": { "name": "s", "key": "db" } },
                "rpc": { "urlSecretRef": { "name": "s", "key": "rpc" } },
            });
            if let Some(r) = rate {
                spec["rateLimits"] = serde_json::json!({ "notifiesPerSecond": r });
            }
            let mut c = PbxConnection::new("acme", serde_json::from_value(spec).unwrap());
            c.metadata.namespace = Some("ns".into());
            c
        };
        let backends = Backends::default();
        let a = backends.notify_limit(&conn(Some(5))).unwrap();
        let b = backends.notify_limit(&conn(Some(20))).unwrap();
        assert!(
            Arc::ptr_eq(&a, &b),
            "restarts on one connection share one limit"
        );
        assert_eq!(
            a.state.lock().unwrap().0,
            20,
            "a changed rate applies to it"
        );
        assert!(backends.notify_limit(&conn(None)).is_none());
    }
}
