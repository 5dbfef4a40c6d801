//! Fetches the CSV a BulkUserChange names in `spec.source.csv`: a ConfigMap key (text in `data`,
//! or bytes in `binaryData`, gzip allowed so large files fit the 1 MiB object limit) or a Secret
//! key when the file holds sensitive columns (only a Secret labelled usable by changes, see
//! [`super::backends::change_secret_bytes`]).
//! The size limit holds after gunzip.

use std::io::Read;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};

use super::Error;
use crate::api::ConfigMapKeyRef;
use crate::api::user_change::CsvSource;
use crate::plan::sheet::SheetError;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

pub async fn fetch(
    client: &Client,
    namespace: &str,
    source: &CsvSource,
    max_bytes: usize,
) -> Result<Vec<u8>, Error> {
    let bytes = match (&source.config_map_key_ref, &source.secret_key_ref) {
        (Some(c), _) => config_map_bytes(client, namespace, c).await?,
        (None, Some(s)) => {
            super::backends::change_secret_bytes(
                client,
                namespace,
                s,
                "spec.source.csv.secretKeyRef",
            )
            .await?
        }
        (None, None) => {
            return Err(Error::CsvSourceMissing {
                namespace: namespace.into(),
                name: String::new(),
                key: String::new(),
                detail: "neither configMapKeyRef nor secretKeyRef is set".into(),
            });
        }
    };
    Ok(gunzip(bytes, max_bytes)?)
}

/// A ConfigMap key's text (`data`) or bytes (`binaryData`).
async fn config_map_bytes(
    client: &Client,
    namespace: &str,
    r: &ConfigMapKeyRef,
) -> Result<Vec<u8>, Error> {
    let missing = |detail: &str| Error::CsvSourceMissing {
        namespace: namespace.to_string(),
        name: r.name.clone(),
        key: r.key.clone(),
        detail: detail.to_string(),
    };
    let cm = match Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get_opt(&r.name)
        .await
    {
        Ok(Some(cm)) => cm,
        Ok(None) => return Err(missing("it does not exist")),
        Err(kube::Error::Api(s)) if s.code == 403 => {
            return Err(missing("the operator may not read it (RBAC)"));
        }
        Err(e) => return Err(Error::Kube(e)),
    };
    match cm.data.and_then(|mut d| d.remove(&r.key)) {
        Some(text) => Ok(text.into_bytes()),
        None => cm
            .binary_data
            .and_then(|mut d| d.remove(&r.key))
            .map(|b| b.0)
            .ok_or_else(|| missing("it has no such key in data or binaryData")),
    }
}

/// Gzip-compressed bytes are inflated, reading at most one byte past the limit, so a small
/// upload cannot expand into a large allocation.
pub fn gunzip(bytes: Vec<u8>, max_bytes: usize) -> Result<Vec<u8>, SheetError> {
    if !bytes.starts_with(&GZIP_MAGIC) {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    let limit = max_bytes as u64 + 1;
    flate2::read::MultiGzDecoder::new(bytes.as_slice())
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| {
            SheetError::NotCsv(format!(
                "it looks gzip-compressed but does not inflate ({e})"
            ))
        })?;
    if out.len() > max_bytes {
        return Err(SheetError::TooLarge {
            size: out.len(),
            limit: max_bytes,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn gzip_is_inflated_within_the_limit() {
        let text = b"extension,callerIdPolicy\n201,Default\n".to_vec();
        assert_eq!(gunzip(gz(&text), 1000).unwrap(), text);
        assert_eq!(
            gunzip(text.clone(), 1000).unwrap(),
            text,
            "plain text passes"
        );
        let bomb = gz(&vec![b'a'; 100_000]);
        assert!(matches!(
            gunzip(bomb, 1000),
            Err(SheetError::TooLarge { limit: 1000, .. })
        ));
        assert!(matches!(
            gunzip(vec![0x1f, 0x8b, 1, 2, 3], 1000),
            Err(SheetError::NotCsv(_))
        ));
    }
}
