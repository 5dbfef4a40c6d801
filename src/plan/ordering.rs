//! Which operations on one PbxConnection may run at the same time: the ordering rule, pure.
//!
//! An operation about to start (the candidate) waits when an operation that still runs shares
//! a target with it, when an earlier operation (by creation) that has not started yet shares a
//! target with it or is not planned yet (its targets are not known), or when the connection
//! already runs as many operations as its limit allows. Otherwise it starts. Only earlier
//! operations hold a later one back, so waiting never forms a cycle and overlapping operations
//! run in creation order. Validate runs never ask (they write nothing).

/// Targets as the ordering sees them, kind-qualified (`user:1001`, `phone:...`), so a user and
/// a phone that happen to share a name never overlap. A running operation's set lives as long
/// as it runs (100,000 keys for a large tenant's change), so it is packed: the sorted, distinct
/// keys end to end in one string, about 14 bytes a user instead of a tree node and a heap
/// string each (about 70).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    text: String,
    /// Where each key ends in `text`.
    ends: Vec<u32>,
}

impl Targets {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn key(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.text[start..self.ends[i] as usize]
    }

    /// The keys in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        (0..self.len()).map(|i| self.key(i))
    }

    pub fn contains(&self, key: &str) -> bool {
        let (mut low, mut high) = (0, self.len());
        while low < high {
            let mid = (low + high) / 2;
            match self.key(mid).cmp(key) {
                std::cmp::Ordering::Less => low = mid + 1,
                std::cmp::Ordering::Greater => high = mid,
                std::cmp::Ordering::Equal => return true,
            }
        }
        false
    }
}

/// Collects keys in any order, with repeats; [`TargetsBuilder::finish`] sorts them once.
#[derive(Default)]
pub struct TargetsBuilder {
    unsorted: Targets,
}

impl TargetsBuilder {
    pub fn insert(&mut self, key: &str) {
        self.unsorted.text.push_str(key);
        self.unsorted.ends.push(self.unsorted.text.len() as u32);
    }

    pub fn finish(self) -> Targets {
        let unsorted = self.unsorted;
        let mut order: Vec<u32> = (0..unsorted.len() as u32).collect();
        order.sort_unstable_by(|a, b| unsorted.key(*a as usize).cmp(unsorted.key(*b as usize)));
        order.dedup_by(|a, b| unsorted.key(*a as usize) == unsorted.key(*b as usize));
        let mut sorted = Targets {
            text: String::with_capacity(unsorted.text.len()),
            ends: Vec::with_capacity(order.len()),
        };
        for i in order {
            sorted.text.push_str(unsorted.key(i as usize));
            sorted.ends.push(sorted.text.len() as u32);
        }
        sorted.text.shrink_to_fit();
        sorted
    }
}

impl<S: AsRef<str>> FromIterator<S> for Targets {
    fn from_iter<I: IntoIterator<Item = S>>(keys: I) -> Self {
        let mut builder = TargetsBuilder::default();
        for key in keys {
            builder.insert(key.as_ref());
        }
        builder.finish()
    }
}

/// A user target's key.
pub fn user(extension: &str) -> String {
    format!("user:{extension}")
}

/// A phone target's key.
pub fn phone(target: &str) -> String {
    format!("phone:{target}")
}

/// When an operation was created: its creation time (seconds), then its name, since several
/// objects of one `kubectl apply` share a second.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Created {
    pub at: i64,
    pub name: String,
}

/// An operation on the same connection as the candidate.
#[derive(Clone, Debug)]
pub struct Other<'a> {
    /// How people name it (`BulkUserChange sales-1`).
    pub id: String,
    pub created: Created,
    pub state: State,
    /// Its targets, when known.
    pub targets: Option<&'a Targets>,
}

/// Where another operation stands, as far as ordering goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Executing (or admitted to): it holds its targets.
    Running,
    /// Not started yet and going to (Execute mode, not refused).
    Waiting,
}

/// Whether the candidate starts now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Start,
    Wait(Reason),
}

/// Why the candidate waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// `earlier` shares `shared` targets with it (`first`: a few of them); `running`: whether
    /// it runs now or waits itself.
    Overlap {
        earlier: String,
        shared: usize,
        first: Vec<String>,
        running: bool,
    },
    /// `earlier` was created first and its targets are not known yet.
    Unplanned { earlier: String },
    /// The connection already runs `running` operations, its limit.
    Limit { running: usize, limit: u32 },
}

/// How many contested targets a message names at most.
pub const FIRST: usize = 5;

impl Reason {
    /// A machine-readable reason for conditions.
    pub fn code(&self) -> &'static str {
        match self {
            Reason::Overlap { .. } | Reason::Unplanned { .. } => "WaitingForEarlierOperation",
            Reason::Limit { .. } => "ConcurrencyLimit",
        }
    }

    /// The sentence people read.
    pub fn message(&self) -> String {
        match self {
            Reason::Overlap {
                earlier,
                shared,
                first,
                running,
            } => {
                let what = if *running {
                    "which is running"
                } else {
                    "which was created earlier and waits itself"
                };
                let first = first
                    .iter()
                    .map(|t| t.split_once(':').map_or(t.as_str(), |(_, v)| v))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!(
                    "waits for {earlier}, {what}: they share {shared} targets ({first}); starts when it finishes"
                )
            }
            Reason::Unplanned { earlier } => format!(
                "waits for {earlier}, which was created earlier and is not planned yet; starts once its targets are known not to overlap, or when it finishes"
            ),
            Reason::Limit { running, limit } => format!(
                "waits: the connection runs {running} operations, its limit (spec.limits.concurrentOperations = {limit}); starts when one finishes"
            ),
        }
    }
}

/// Decides for `candidate` (created `created`, touching `targets`) against the other operations
/// on its connection. `limit`: how many may run at once (at least 1).
pub fn decide(created: &Created, targets: &Targets, others: &[Other<'_>], limit: u32) -> Decision {
    let mut sorted: Vec<&Other<'_>> = others.iter().collect();
    sorted.sort_by(|a, b| a.created.cmp(&b.created));
    let shared = |o: &Other<'_>| -> Option<(usize, Vec<String>)> {
        let theirs = o.targets?;
        let (small, big) = if theirs.len() < targets.len() {
            (theirs, targets)
        } else {
            (targets, theirs)
        };
        let common: Vec<&str> = small.iter().filter(|t| big.contains(t)).collect();
        Some((
            common.len(),
            common.iter().take(FIRST).map(|t| t.to_string()).collect(),
        ))
    };
    // Running operations first: whatever their age, they hold their targets.
    for o in sorted.iter().filter(|o| o.state == State::Running) {
        match shared(o) {
            Some((0, _)) => {}
            Some((n, first)) => {
                return Decision::Wait(Reason::Overlap {
                    earlier: o.id.clone(),
                    shared: n,
                    first,
                    running: true,
                });
            }
            // Its targets could not be read: it might hold any of them.
            None => {
                return Decision::Wait(Reason::Unplanned {
                    earlier: o.id.clone(),
                });
            }
        }
    }
    for o in sorted
        .iter()
        .filter(|o| o.state == State::Waiting && o.created < *created)
    {
        match shared(o) {
            Some((0, _)) => {}
            Some((n, first)) => {
                return Decision::Wait(Reason::Overlap {
                    earlier: o.id.clone(),
                    shared: n,
                    first,
                    running: false,
                });
            }
            None => {
                return Decision::Wait(Reason::Unplanned {
                    earlier: o.id.clone(),
                });
            }
        }
    }
    let running = sorted.iter().filter(|o| o.state == State::Running).count();
    let limit = limit.max(1);
    if running >= limit as usize {
        return Decision::Wait(Reason::Limit { running, limit });
    }
    Decision::Start
}

/// What an Enforce change keeps in place: its targets and the value of each field it sets
/// (None: the field is cleared).
#[derive(Clone, Copy, Debug)]
pub struct Desired<'a> {
    pub targets: &'a Targets,
    pub fields: &'a std::collections::BTreeMap<String, Option<String>>,
}

/// Where two Enforce changes want different things.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contested {
    /// Fields both set, to different values.
    pub fields: Vec<String>,
    /// Targets both hold.
    pub targets: usize,
    /// The first few of them.
    pub first: Vec<String>,
}

impl Contested {
    /// The sentence people read, naming both changes.
    pub fn message(&self, earlier: &str, later: &str) -> String {
        let first = self
            .first
            .iter()
            .map(|t| t.split_once(':').map_or(t.as_str(), |(_, v)| v))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "{later} and {earlier} (Enforce, created earlier) set {} of the same {} targets ({first}) to different values: enforcing both would undo each other forever, so {later} is refused and changes nothing. Remove the contradiction (change or delete one of them)",
            self.fields.join(", "),
            self.targets
        )
    }
}

/// Whether two Enforce changes contradict each other: a field both set to different values, on
/// a target both hold. Secret fields are never compared (their values are not known here).
pub fn contradiction(earlier: Desired<'_>, later: Desired<'_>) -> Option<Contested> {
    let fields: Vec<String> = later
        .fields
        .iter()
        .filter(|(f, v)| earlier.fields.get(*f).is_some_and(|e| e != *v))
        .map(|(f, _)| f.clone())
        .collect();
    if fields.is_empty() {
        return None;
    }
    let shared: Vec<&str> = later
        .targets
        .iter()
        .filter(|t| earlier.targets.contains(t))
        .collect();
    if shared.is_empty() {
        return None;
    }
    Some(Contested {
        fields,
        targets: shared.len(),
        first: shared.iter().take(FIRST).map(|t| t.to_string()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(users: &[&str]) -> Targets {
        users.iter().map(|u| user(u)).collect()
    }

    #[test]
    fn targets_are_sorted_distinct_and_found_by_key() {
        let t: Targets = ["user:20", "phone:1", "user:100", "user:20", "", "user:2"]
            .into_iter()
            .collect();
        assert_eq!(
            t.iter().collect::<Vec<_>>(),
            ["", "phone:1", "user:100", "user:2", "user:20"]
        );
        assert_eq!(t.len(), 5);
        for key in ["", "phone:1", "user:100", "user:2", "user:20"] {
            assert!(t.contains(key), "{key}");
        }
        for key in ["user:1", "user:200", "phone:", "zzz", "a"] {
            assert!(!t.contains(key), "{key}");
        }
        assert!(Targets::default().is_empty() && !Targets::default().contains(""));
    }

    fn at(n: i64, name: &str) -> Created {
        Created {
            at: n,
            name: name.into(),
        }
    }

    fn other<'a>(name: &str, created: i64, state: State, t: Option<&'a Targets>) -> Other<'a> {
        Other {
            id: format!("BulkUserChange {name}"),
            created: at(created, name),
            state,
            targets: t,
        }
    }

    #[test]
    fn disjoint_operations_start_side_by_side() {
        let a = set(&["1001", "1002"]);
        let others = [other("a", 1, State::Running, Some(&a))];
        assert_eq!(
            decide(&at(2, "b"), &set(&["2001"]), &others, 4),
            Decision::Start
        );
    }

    #[test]
    fn a_running_overlap_holds_the_candidate_and_counts_what_they_share() {
        let a = set(&["1001", "1002", "1003"]);
        let others = [other("a", 1, State::Running, Some(&a))];
        let d = decide(&at(2, "b"), &set(&["1002", "1003", "1004"]), &others, 4);
        let Decision::Wait(r) = d else {
            panic!("{d:?}")
        };
        assert_eq!(
            r,
            Reason::Overlap {
                earlier: "BulkUserChange a".into(),
                shared: 2,
                first: vec!["user:1002".into(), "user:1003".into()],
                running: true,
            }
        );
        assert!(
            r.message().contains("share 2 targets (1002, 1003)"),
            "{}",
            r.message()
        );
        assert_eq!(r.code(), "WaitingForEarlierOperation");
    }

    #[test]
    fn overlapping_waiters_go_in_creation_order() {
        // a runs; b and c wait; both overlap a and each other.
        let (a, b, c) = (set(&["1"]), set(&["1", "2"]), set(&["2"]));
        let waiting = [
            other("a", 1, State::Running, Some(&a)),
            other("c", 1, State::Waiting, Some(&c)),
        ];
        // b: held by a (running).
        assert!(matches!(
            decide(&at(1, "b"), &b, &waiting, 4),
            Decision::Wait(Reason::Overlap { running: true, .. })
        ));
        // a finished: b starts (c is later, by name within the same second) ...
        let after_a = [other("c", 1, State::Waiting, Some(&c))];
        assert_eq!(decide(&at(1, "b"), &b, &after_a, 4), Decision::Start);
        // ... and c, not overlapping a, still waits for the earlier b that shares "2".
        let before_b = [other("b", 1, State::Waiting, Some(&b))];
        assert!(matches!(
            decide(&at(1, "c"), &c, &before_b, 4),
            Decision::Wait(Reason::Overlap {
                running: false,
                shared: 1,
                ..
            })
        ));
    }

    #[test]
    fn a_later_waiter_never_holds_an_earlier_one() {
        let b = set(&["1"]);
        let others = [other("z-later", 5, State::Waiting, Some(&b))];
        assert_eq!(
            decide(&at(1, "a"), &set(&["1"]), &others, 4),
            Decision::Start
        );
    }

    #[test]
    fn an_earlier_unplanned_operation_holds_later_ones() {
        let others = [other("a", 1, State::Waiting, None)];
        assert_eq!(
            decide(&at(2, "b"), &set(&["9"]), &others, 4),
            Decision::Wait(Reason::Unplanned {
                earlier: "BulkUserChange a".into()
            })
        );
        // A running operation whose targets could not be read holds everyone.
        let others = [other("z", 9, State::Running, None)];
        assert!(matches!(
            decide(&at(2, "b"), &set(&["9"]), &others, 4),
            Decision::Wait(Reason::Unplanned { .. })
        ));
    }

    #[test]
    fn the_limit_bounds_disjoint_operations() {
        let sets: Vec<Targets> = (0..4).map(|i| set(&[&format!("{i}")])).collect();
        let others: Vec<Other<'_>> = sets
            .iter()
            .enumerate()
            .map(|(i, s)| other(&format!("r{i}"), 1, State::Running, Some(s)))
            .collect();
        let mine = set(&["x"]);
        assert_eq!(
            decide(&at(2, "b"), &mine, &others, 4),
            Decision::Wait(Reason::Limit {
                running: 4,
                limit: 4
            })
        );
        assert_eq!(decide(&at(2, "b"), &mine, &others[..3], 4), Decision::Start);
        // A limit of 0 is read as 1.
        assert!(matches!(
            decide(&at(2, "b"), &mine, &others[..1], 0),
            Decision::Wait(Reason::Limit { limit: 1, .. })
        ));
    }

    #[test]
    fn users_and_phones_never_overlap() {
        let a: Targets = [phone("1001")].into_iter().collect();
        let others = [other("a", 1, State::Running, Some(&a))];
        assert_eq!(
            decide(&at(2, "b"), &set(&["1001"]), &others, 4),
            Decision::Start
        );
    }

    #[test]
    fn enforce_changes_contradict_on_a_shared_target_and_field_with_other_values() {
        let fields =
            |pairs: &[(&str, Option<&str>)]| -> std::collections::BTreeMap<String, Option<String>> {
                pairs
                    .iter()
                    .map(|(f, v)| (f.to_string(), v.map(str::to_string)))
                    .collect()
            };
        let (a_t, b_t, c_t) = (set(&["1", "2", "3"]), set(&["3", "4"]), set(&["9"]));
        let a_f = fields(&[("callGroup", Some("1")), ("email", Some("x@y"))]);
        let same = fields(&[("callGroup", Some("1"))]);
        let other = fields(&[("callGroup", Some("2")), ("email", Some("x@y"))]);
        let cleared = fields(&[("callGroup", None)]);
        let a = Desired {
            targets: &a_t,
            fields: &a_f,
        };
        let c = contradiction(
            a,
            Desired {
                targets: &b_t,
                fields: &other,
            },
        )
        .unwrap();
        assert_eq!(c.fields, ["callGroup"]);
        assert_eq!((c.targets, c.first.clone()), (1, vec![user("3")]));
        let m = c.message("BulkUserChange a", "BulkUserChange b");
        assert!(
            m.contains("BulkUserChange a") && m.contains("BulkUserChange b") && m.contains("(3)"),
            "{m}"
        );
        assert!(
            contradiction(
                a,
                Desired {
                    targets: &b_t,
                    fields: &cleared
                }
            )
            .is_some(),
            "clearing differs too"
        );
        assert_eq!(
            contradiction(
                a,
                Desired {
                    targets: &b_t,
                    fields: &same
                }
            ),
            None,
            "the same value agrees"
        );
        assert_eq!(
            contradiction(
                a,
                Desired {
                    targets: &c_t,
                    fields: &other
                }
            ),
            None,
            "no shared target"
        );
    }
}
