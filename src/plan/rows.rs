//! The plan of a CSV-sourced change: each valid row diffed against the PBX as the rows before it
//! leave it (rows apply in file order), numbers taken from whoever holds them, and a hash that
//! pins it all. Pure: the controller reads the users and policies, this decides.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::PlanError;
use super::sheet::RowRequest;
use super::users::{ActionKind, Intent, Wanted, secret_pin};
use crate::pbx::directory::{Directory, Move};
use crate::pbx::{FieldWrite, NewValue, Policies, User, UserField};

/// One CSV row in a plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowPlan {
    pub line: u64,
    pub extension: String,
    pub writes: Vec<FieldWrite>,
    /// Numbers this row takes from other users.
    pub takes: Vec<Move>,
    pub actions: Vec<ActionKind>,
    /// Why the row is not applied; empty for a valid row.
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

impl RowPlan {
    pub fn changes_anything(&self) -> bool {
        !self.writes.is_empty() || !self.actions.is_empty()
    }
}

/// A user without a row of its own who gives a number to a row's user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Donor {
    /// Index of the taking row in [`RowsPlan::rows`].
    pub row: usize,
    pub extension: String,
    pub number: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowsPlan {
    pub rows: Vec<RowPlan>,
    pub donors: Vec<Donor>,
    pub hash: String,
}

impl RowsPlan {
    pub fn changing(&self) -> usize {
        self.rows.iter().filter(|r| r.changes_anything()).count()
    }
    pub fn invalid(&self) -> usize {
        self.rows.iter().filter(|r| !r.errors.is_empty()).count()
    }
}

pub fn taker_note(field: UserField, m: &Move) -> String {
    format!(
        "warning: {field} {} was held by {} (its {}); it moves to this user",
        m.number, m.holder, m.held_as
    )
}

pub fn holder_note(number: &str, taker: &str, line: u64) -> String {
    format!("warning: number {number} moves from this user to {taker} (CSV line {line})")
}

/// What every row is planned against, besides the PBX's users.
pub struct Rules<'a> {
    /// What spec.fields (Open) and spec.actions add to every valid row.
    pub base: &'a Intent,
    pub policies: &'a Policies,
    /// The fields the backend can store.
    pub supported: &'a [UserField],
    /// One invalid row stops every row.
    pub atomic: bool,
}

/// Plans the rows in order. `row_of`: each extension's first row (index among the rows);
/// `users`: the rows' users and every holder of a number the rows give.
pub fn plan_rows(
    requests: impl IntoIterator<Item = RowRequest>,
    row_of: &HashMap<String, usize>,
    users: Vec<User>,
    rules: &Rules,
) -> Result<RowsPlan, PlanError> {
    let Rules {
        base,
        policies,
        supported,
        atomic,
    } = *rules;
    base.check_supported(supported)?;
    let mut dir = Directory::untracked(users);
    let mut actions = base.actions.clone();
    actions.sort();
    actions.dedup();
    let mut rows = Vec::new();
    let mut donors = Vec::new();
    let mut holder_notes: Vec<(usize, String)> = Vec::new();
    for (i, req) in requests.into_iter().enumerate() {
        let mut row = RowPlan {
            line: req.line,
            extension: req.extension,
            errors: req.errors,
            warnings: req.warnings,
            ..Default::default()
        };
        if row.errors.is_empty() && dir.get(&row.extension).is_none() {
            row.errors
                .push("this row's extension does not exist on the PBX".into());
        }
        for (field, value) in &req.values {
            if !supported.contains(field) {
                row.errors.push(format!(
                    "the PBX backend cannot store {field}; remove the column"
                ));
            }
            if let Some(known) = policies.known(*field) {
                let current = dir.get(&row.extension).and_then(|u| u.get(*field));
                if !known.contains(value) && current != Some(value.as_str()) {
                    row.errors.push(format!(
                        "unknown {field}; the PBX knows: {}",
                        known.iter().cloned().collect::<Vec<_>>().join(", ")
                    ));
                }
            }
        }
        if !row.errors.is_empty() {
            rows.push(row);
            continue;
        }
        let mut wanted: Vec<(UserField, NewValue)> = req
            .values
            .into_iter()
            .map(|(f, v)| (f, NewValue::Set(v)))
            .collect();
        for f in base.fields.iter().filter(|f| f.open) {
            if wanted.iter().any(|(w, _)| *w == f.field) {
                continue;
            }
            wanted.push((
                f.field,
                match &f.wanted {
                    Wanted::Value(Some(v)) => NewValue::Set(v.clone()),
                    Wanted::Value(None) => NewValue::Clear,
                    Wanted::Secret(s) => NewValue::Secret(s.clone()),
                },
            ));
        }
        for (field, to) in wanted {
            let current = dir
                .get(&row.extension)
                .and_then(|u| u.get(field))
                .map(str::to_string);
            // A secret is always written: what is stored for it cannot be compared cheaply.
            let unchanged = match &to {
                NewValue::Set(v) => current.as_deref() == Some(v.as_str()),
                NewValue::Clear => current.is_none(),
                NewValue::Secret(_) => false,
            };
            if unchanged {
                continue;
            }
            for m in dir.apply(&row.extension, field, &to, &|_, _, _| NEW_SECRET.into()) {
                row.warnings.push(taker_note(field, &m));
                match row_of.get(&m.holder) {
                    Some(&j) => {
                        holder_notes.push((j, holder_note(&m.number, &row.extension, row.line)))
                    }
                    None => donors.push(Donor {
                        row: i,
                        extension: m.holder.clone(),
                        number: m.number.clone(),
                    }),
                }
                row.takes.push(m);
            }
            row.writes.push(FieldWrite {
                field,
                from: current,
                to,
            });
        }
        row.actions = actions.clone();
        rows.push(row);
    }
    for (j, note) in holder_notes {
        rows[j].warnings.push(note);
    }
    let invalid: Vec<u64> = rows
        .iter()
        .filter(|r| !r.errors.is_empty())
        .map(|r| r.line)
        .collect();
    if atomic && !invalid.is_empty() {
        let why = format!(
            "not applied: failurePolicy is Atomic and {} rows are invalid (first on line {}); fix them, or use failurePolicy Continue",
            invalid.len(),
            invalid[0]
        );
        for r in rows.iter_mut().filter(|r| r.errors.is_empty()) {
            r.writes.clear();
            r.takes.clear();
            r.actions.clear();
            r.warnings.retain(|w| !w.starts_with("warning: "));
            r.errors.push(why.clone());
        }
        donors.clear();
        for r in rows.iter_mut() {
            r.warnings.retain(|w| !w.starts_with("warning: number "));
        }
    }
    let hash = hash(&rows);
    Ok(RowsPlan { rows, donors, hash })
}

/// What the planner's directory holds for a secret it will write (nothing of its value).
const NEW_SECRET: &str = "(new secret)";

/// sha256 over the rows; a secret write contributes its Secret's reference only, never its
/// value, a digest of it, or what the PBX stores for it now.
fn hash(rows: &[RowPlan]) -> String {
    let mut hasher = Sha256::new();
    let mut line = |parts: &[&str]| {
        hasher.update(parts.join("\t").as_bytes());
        hasher.update(b"\n");
    };
    for r in rows {
        line(&["row", &r.line.to_string(), &r.extension]);
        for w in &r.writes {
            match &w.to {
                NewValue::Secret(s) => line(&["secret", w.field.name(), secret_pin(s)]),
                to => line(&[
                    "field",
                    w.field.name(),
                    w.from.as_deref().unwrap_or("\u{0}"),
                    match to {
                        NewValue::Set(v) => v,
                        _ => "\u{0}",
                    },
                ]),
            }
        }
        for t in &r.takes {
            line(&["take", &t.number, &t.holder]);
        }
        for a in &r.actions {
            line(&["action", a.name()]);
        }
        for e in &r.errors {
            line(&["error", e]);
        }
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::sheet::{self, DEFAULT_MAX_BYTES};

    fn user(ext: &str, number: Option<&str>, private: Option<&str>) -> User {
        let mut u = User {
            extension: ext.into(),
            ..Default::default()
        };
        u.values.insert(UserField::EnterpriseVoice, "false".into());
        u.values.insert(UserField::CallerIdPolicy, "Default".into());
        if let Some(n) = number {
            u.numbers.push(n.into());
            u.values.insert(UserField::PrimaryNumber, n.into());
        }
        if let Some(p) = private {
            u.values.insert(UserField::PrivateNumber, p.into());
        }
        u
    }

    fn policies() -> Policies {
        Policies {
            caller_id: ["Default", "Anonymous"].map(String::from).into(),
            voice_route: ["Domestic", "International"].map(String::from).into(),
        }
    }

    fn plan(csv: &str, users: Vec<User>, atomic: bool) -> RowsPlan {
        let s = sheet::read(csv.as_bytes(), DEFAULT_MAX_BYTES).unwrap();
        let reqs: Vec<RowRequest> = sheet::requests(&s, &[]).collect();
        let mut row_of = HashMap::new();
        for (i, r) in reqs.iter().enumerate() {
            row_of.entry(r.extension.clone()).or_insert(i);
        }
        let rules = Rules {
            base: &Intent::default(),
            policies: &policies(),
            supported: &UserField::ALL,
            atomic,
        };
        plan_rows(reqs, &row_of, users, &rules).unwrap()
    }

    fn users() -> Vec<User> {
        vec![
            user("201", Some("+15550100201"), None),
            user("202", Some("+15550100202"), Some("+15550200202")),
            user("203", None, None),
        ]
    }

    #[test]
    fn a_number_moves_with_warnings_on_both_sides() {
        let p = plan(
            "extension,primaryNumber,callerIdPolicy\n203,+15550100201,\n201,,Anonymous\n",
            users(),
            false,
        );
        let taker = &p.rows[0];
        assert_eq!(taker.takes.len(), 1);
        assert_eq!(taker.takes[0].holder, "201");
        assert!(
            taker.warnings[0].contains("was held by 201"),
            "{:?}",
            taker.warnings
        );
        let holder = &p.rows[1];
        assert!(
            holder
                .warnings
                .iter()
                .any(|w| w.contains("moves from this user to 203 (CSV line 2)"))
        );
        assert_eq!(holder.writes.len(), 1, "201's own row still applies");
        assert!(p.donors.is_empty(), "the holder has its own row");
    }

    #[test]
    fn a_holder_without_a_row_is_a_donor() {
        let p = plan(
            "extension,privateNumber\n203,+15550200202\n",
            users(),
            false,
        );
        assert_eq!(
            p.donors,
            [Donor {
                row: 0,
                extension: "202".into(),
                number: "+15550200202".into()
            }]
        );
        assert_eq!(p.rows[0].takes[0].held_as, UserField::PrivateNumber);
    }

    #[test]
    fn later_rows_see_what_earlier_rows_did() {
        // A swap: 201 takes 202's number, then 202 takes 201's old one, which is free by then.
        let p = plan(
            "extension,primaryNumber\n201,+15550100202\n202,+15550100201\n",
            users(),
            false,
        );
        assert_eq!(p.rows[0].takes.len(), 1);
        assert!(p.rows[1].takes.is_empty(), "{:?}", p.rows[1].takes);
        assert_eq!(
            p.rows[1].writes[0].from, None,
            "202 lost its number to row 1 before row 2"
        );
    }

    #[test]
    fn unknown_extensions_and_policies_are_row_errors() {
        let p = plan(
            "extension,callerIdPolicy,voiceRoutePolicy\n999,Default,\n201,Secret,\n202,Default,Domestic\n",
            users(),
            false,
        );
        assert_eq!(
            p.rows[0].errors,
            ["this row's extension does not exist on the PBX"]
        );
        assert!(
            p.rows[1].errors[0]
                .starts_with("unknown callerIdPolicy; the PBX knows: Anonymous, Default")
        );
        assert!(p.rows[2].errors.is_empty());
        assert_eq!(
            p.rows[2].writes.len(),
            1,
            "Default is already set; only the route changes"
        );
        assert_eq!(p.invalid(), 2);
    }

    #[test]
    fn atomic_stops_every_row_when_one_is_invalid() {
        let p = plan(
            "extension,primaryNumber\n203,+15550100201\n999,\n",
            users(),
            true,
        );
        assert!(p.rows[0].writes.is_empty() && p.rows[0].takes.is_empty());
        assert!(
            p.rows[0].errors[0]
                .contains("failurePolicy is Atomic and 1 rows are invalid (first on line 3)")
        );
        assert!(p.donors.is_empty());
        assert_eq!(p.changing(), 0);
    }

    #[test]
    fn equal_values_plan_nothing_and_the_hash_follows_the_state() {
        let csv = "extension,primaryNumber,enterpriseVoice\n201,+15550100201,false\n";
        let a = plan(csv, users(), false);
        assert_eq!(a.changing(), 0);
        let mut moved = users();
        moved[0]
            .values
            .insert(UserField::EnterpriseVoice, "true".into());
        let b = plan(csv, moved, false);
        assert_eq!(b.changing(), 1);
        assert_ne!(a.hash, b.hash);
    }
}
