//! Which run a resource asks for (its spec generation and the retry it serves), recorded typed
//! in status.progress so that resuming, retrying and Enforce checks never match strings.

use kube::Resource;

use crate::api::Progress;

/// The retry annotation: a new value asks for a retry of the failed and uncertain steps.
pub const RETRY_ANNOTATION: &str = "pbx-operator.io/retry";

/// Which run a resource asks for: its spec generation, and the retry it serves. Recorded typed
/// in status.progress; `run` there is the same for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Lineage {
    pub generation: i64,
    pub retry: Option<String>,
}

impl Lineage {
    pub fn of<K: Resource>(obj: &K) -> Lineage {
        let retry = obj.meta().annotations.as_ref().and_then(|a| {
            a.get(RETRY_ANNOTATION).map(|v| {
                v.chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .take(40)
                    .collect()
            })
        });
        Lineage {
            generation: obj.meta().generation.unwrap_or(0),
            retry,
        }
    }

    /// The lineage a recorded run served. Runs recorded by an operator from before the typed
    /// fields have only the id (`g<generation>[-retry-<value>][-check-<time>]`): read once here.
    pub fn recorded(p: &Progress) -> Lineage {
        if let Some(generation) = p.generation {
            return Lineage {
                generation,
                retry: p.retry.clone(),
            };
        }
        let base = p.run.split("-check-").next().unwrap_or_default();
        let (generation, retry) = match base.split_once("-retry-") {
            Some((g, r)) => (g, Some(r.to_string())),
            None => (base, None),
        };
        Lineage {
            generation: generation
                .strip_prefix('g')
                .and_then(|g| g.parse().ok())
                .unwrap_or(-1),
            retry,
        }
    }

    /// Whether `p` is a run of this lineage (its Enforce checks included).
    pub fn serves(&self, p: &Progress) -> bool {
        Lineage::recorded(p) == *self
    }

    /// Whether `p` ran the same spec generation: only then may a retry build on its results.
    pub fn same_generation(&self, p: &Progress) -> bool {
        Lineage::recorded(p).generation == self.generation
    }

    /// A new run's progress; `check` for an Enforce correction.
    pub fn progress(&self, batches: usize, done: usize, check: Option<i64>) -> Progress {
        let mut run = format!("g{}", self.generation);
        if let Some(r) = &self.retry {
            run.push_str(&format!("-retry-{r}"));
        }
        if let Some(t) = check {
            run.push_str(&format!("-check-{t}"));
        }
        Progress {
            run,
            generation: Some(self.generation),
            retry: self.retry.clone(),
            check,
            batches: batches as u32,
            done: done as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_recorded_by_an_older_operator_keeps_its_lineage() {
        let legacy = |run: &str| Progress {
            run: run.into(),
            ..Progress::default()
        };
        let retry = Lineage {
            generation: 3,
            retry: Some("a-1".into()),
        };
        assert!(retry.serves(&legacy("g3-retry-a-1")));
        assert!(retry.serves(&legacy("g3-retry-a-1-check-1700000000")));
        assert!(!retry.serves(&legacy("g3")));
        assert!(retry.same_generation(&legacy("g3")));
        assert!(!retry.same_generation(&legacy("g4-retry-a-1")));
    }

    #[test]
    fn typed_progress_round_trips() {
        let l = Lineage {
            generation: 7,
            retry: None,
        };
        let p = l.progress(3, 1, Some(42));
        assert_eq!(p.run, "g7-check-42");
        assert!(l.serves(&p));
        let retry = Lineage {
            retry: Some("x".into()),
            ..l.clone()
        };
        assert!(!retry.serves(&p), "a retry is a new run");
        assert!(retry.same_generation(&p));
    }
}
