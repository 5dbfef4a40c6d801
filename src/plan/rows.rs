//! The plan of a CSV-sourced change: each valid row diffed against the PBX as the rows before it
//! leave it (rows apply in file order), numbers taken from whoever holds them, and a hash that
//! pins it all. Pure: the engine reads the users and policies, this decides.
//!
//! A row changes no other user's state but through a number it takes (one user in two rows, or
//! one number in two rows, makes those rows invalid). So the rows of the users numbers move
//! between (the movers: a row taking a number someone else holds, and that holder) are
//! rehearsed first, together and in file order, for what a row leaves on another (a holder's
//! note, a donor). Then every row is planned in file order: a mover's against the movers'
//! users, every other one against its own user, read with its chunk of the file.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

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
    pub extension: String,
    pub number: String,
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
#[derive(Clone)]
pub struct Rules<'a> {
    /// What spec.fields (Open) and spec.actions add to every valid row.
    pub base: &'a Intent,
    pub policies: Policies,
    /// The fields the backend can store.
    pub supported: Vec<UserField>,
    /// One invalid row stops every row.
    pub atomic: bool,
}

/// The numbers a row gives: its own cells' and spec.fields' (Open) for every valid row.
pub fn numbers_given(req: &RowRequest, base: &Intent) -> Vec<String> {
    if !req.errors.is_empty() {
        return vec![];
    }
    let mut out: Vec<String> = req
        .values
        .iter()
        .filter(|(f, _)| f.is_number())
        .map(|(_, v)| v.clone())
        .collect();
    for f in base.fields.iter().filter(|f| f.open && f.field.is_number()) {
        if let Wanted::Value(Some(v)) = &f.wanted
            && !req.values.iter().any(|(w, _)| *w == f.field)
        {
            out.push(v.clone());
        }
    }
    out
}

/// Adds the movers of some rows to `movers`: `given` holds (number, the row's extension) for the
/// numbers the rows give, `holders` (number, extension) who holds them on the PBX.
pub fn add_movers(
    given: &[(String, String)],
    holders: &[(String, String)],
    movers: &mut HashSet<String>,
) {
    let mut takers: HashMap<&str, Vec<&str>> = HashMap::new();
    for (number, extension) in given {
        takers.entry(number).or_default().push(extension);
    }
    for (number, holder) in holders {
        for &t in takers.get(number.as_str()).into_iter().flatten() {
            if t != holder {
                movers.insert(t.to_string());
                movers.insert(holder.clone());
            }
        }
    }
}

/// What the rows planned so far add up to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub rows: usize,
    pub changing: usize,
    pub invalid: usize,
    pub first_invalid: Option<u64>,
}

impl Tally {
    /// Why an Atomic change applies none of its rows: some are invalid.
    pub fn atomic_refusal(&self) -> Option<String> {
        let first = self.first_invalid?;
        Some(format!(
            "not applied: failurePolicy is Atomic and {} rows are invalid (first on line {first}); fix them, or use failurePolicy Continue",
            self.invalid
        ))
    }
}

/// Plans a file's rows in file order, each once, through [`RowsPlanner::next`].
pub struct RowsPlanner<'a> {
    rules: RowRules<'a>,
    movers: Arc<HashSet<String>>,
    /// The movers' users as the rows planned so far leave them.
    dir: Directory,
    /// What a rehearsal of the movers' rows found that a row cannot know when it is planned:
    /// the notes of a holder whose number a later row takes, by the holder's row index...
    notes: HashMap<usize, Vec<String>>,
    /// ...and the users giving a number to a mover's row without a row of their own.
    donors: HashMap<usize, Vec<Donor>>,
    /// An Atomic change with invalid rows: every row says this, none applies.
    refusal: Option<String>,
    hasher: Sha256,
    tally: Tally,
}

struct RowRules<'a> {
    rules: Rules<'a>,
    actions: Vec<ActionKind>,
}

impl<'a> RowsPlanner<'a> {
    /// Rehearses the movers' rows: `requests` are every row of the file in order, `users` the
    /// movers' users. `refusal`: see [`Tally::atomic_refusal`], from an earlier pass.
    pub fn new(
        rules: Rules<'a>,
        requests: impl IntoIterator<Item = RowRequest>,
        movers: Arc<HashSet<String>>,
        users: Vec<User>,
        refusal: Option<String>,
    ) -> Result<RowsPlanner<'a>, PlanError> {
        rules.base.check_supported(&rules.supported)?;
        let mut actions = rules.base.actions.clone();
        actions.sort();
        actions.dedup();
        let rules = RowRules { rules, actions };
        let dir = Directory::untracked(users);
        // The rows are planned again in their turn, from the same state: only what a row
        // leaves for another one is kept here, not the rows.
        let mut rehearsal = dir.clone();
        let mut first_row: HashMap<String, usize> = HashMap::new();
        let mut moves: Vec<(usize, u64, String, Move)> = Vec::new();
        for (i, req) in requests.into_iter().enumerate() {
            if !movers.contains(&req.extension) {
                continue;
            }
            first_row.entry(req.extension.clone()).or_insert(i);
            let (row, taken) = rules.plan(req, &mut rehearsal);
            moves.extend(
                taken
                    .into_iter()
                    .map(|m| (i, row.line, row.extension.clone(), m)),
            );
        }
        drop(rehearsal);
        let mut notes: HashMap<usize, Vec<String>> = HashMap::new();
        let mut donors: HashMap<usize, Vec<Donor>> = HashMap::new();
        for (i, line, taker, m) in moves {
            match first_row.get(&m.holder) {
                Some(&j) => notes
                    .entry(j)
                    .or_default()
                    .push(holder_note(&m.number, &taker, line)),
                None => donors.entry(i).or_default().push(Donor {
                    extension: m.holder,
                    number: m.number,
                }),
            }
        }
        Ok(RowsPlanner {
            rules,
            movers,
            dir,
            notes,
            donors,
            refusal,
            hasher: Sha256::new(),
            tally: Tally::default(),
        })
    }

    /// Whether `extension`'s rows are planned against the movers' users.
    pub fn is_mover(&self, extension: &str) -> bool {
        self.movers.contains(extension)
    }

    /// Plans row `index` of the file (rows come in file order, each once). `chunk` holds the
    /// row's user unless it is a mover. Returns the row and the users giving it a number who
    /// have no row of their own.
    pub fn next(
        &mut self,
        index: usize,
        req: RowRequest,
        chunk: &mut Directory,
    ) -> (RowPlan, Vec<Donor>) {
        let (mut row, mut donors) = if self.movers.contains(&req.extension) {
            let (mut row, _) = self.rules.plan(req, &mut self.dir);
            row.warnings
                .extend(self.notes.remove(&index).unwrap_or_default());
            (row, self.donors.remove(&index).unwrap_or_default())
        } else {
            let (mut row, taken) = self.rules.plan(req, chunk);
            if let Some(m) = taken.first() {
                // Nobody else held the numbers of this row when the movers were found.
                refuse(
                    &mut row,
                    &format!(
                        "number {} is held by {} now, which it was not when this plan began; validate again",
                        m.number, m.holder
                    ),
                );
            }
            (row, vec![])
        };
        if let Some(why) = &self.refusal {
            if row.errors.is_empty() {
                refuse(&mut row, why);
            }
            row.warnings.retain(|w| !w.starts_with("warning: number "));
            donors.clear();
        }
        hash_row(&mut self.hasher, &row);
        self.tally.rows += 1;
        if row.changes_anything() {
            self.tally.changing += 1;
        }
        if !row.errors.is_empty() {
            self.tally.invalid += 1;
            self.tally.first_invalid.get_or_insert(row.line);
        }
        (row, donors)
    }

    /// The plan's hash (sha256 over every row) and its tally.
    pub fn finish(self) -> (String, Tally) {
        (hex::encode(self.hasher.finalize()), self.tally)
    }
}

impl RowRules<'_> {
    /// One row against the users as the rows before it leave them; the moves it makes.
    fn plan(&self, req: RowRequest, dir: &mut Directory) -> (RowPlan, Vec<Move>) {
        let Rules {
            base,
            policies,
            supported,
            ..
        } = &self.rules;
        let mut row = RowPlan {
            line: req.line,
            extension: req.extension,
            errors: req.errors,
            warnings: req.warnings,
            ..Default::default()
        };
        let mut moves = Vec::new();
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
            return (row, moves);
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
                row.takes.push(m.clone());
                moves.push(m);
            }
            row.writes.push(FieldWrite {
                field,
                from: current,
                to,
            });
        }
        row.actions = self.actions.clone();
        (row, moves)
    }
}

/// A valid row made one that applies nothing, for `why`.
fn refuse(row: &mut RowPlan, why: &str) {
    row.writes.clear();
    row.takes.clear();
    row.actions.clear();
    row.warnings.retain(|w| !w.starts_with("warning: "));
    row.errors.push(why.to_string());
}

/// What the planner's directory holds for a secret it will write (nothing of its value).
const NEW_SECRET: &str = "(new secret)";

/// Adds a row to the plan's sha256; a secret write contributes its Secret's reference only,
/// never its value, a digest of it, or what the PBX stores for it now.
fn hash_row(hasher: &mut Sha256, r: &RowPlan) {
    let mut line = |parts: &[&str]| {
        hasher.update(parts.join("\t").as_bytes());
        hasher.update(b"\n");
    };
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

    /// A plan as the engine makes it: the movers from who holds the numbers the rows give,
    /// their rows first, then the file `chunk` rows at a time against those rows' users only;
    /// planned again with the refusal when an Atomic plan has invalid rows.
    struct Planned {
        rows: Vec<RowPlan>,
        /// Donors with the index of the row they give to.
        donors: Vec<(usize, Donor)>,
        hash: String,
        tally: Tally,
    }

    impl Planned {
        fn changing(&self) -> usize {
            self.tally.changing
        }
        fn invalid(&self) -> usize {
            self.tally.invalid
        }
    }

    fn plan_chunked(csv: &str, users: Vec<User>, atomic: bool, chunk: usize) -> Planned {
        let s = sheet::read(csv.as_bytes(), DEFAULT_MAX_BYTES).unwrap();
        let base = Intent::default();
        let rules = Rules {
            base: &base,
            policies: policies(),
            supported: UserField::ALL.to_vec(),
            atomic,
        };
        let requests = sheet::Requests::new(&s, &[]);
        let given: Vec<(String, String)> = requests
            .rows()
            .flat_map(|(r, _)| {
                numbers_given(&r, &base)
                    .into_iter()
                    .map(move |n| (n, r.extension.clone()))
            })
            .collect();
        let holders: Vec<(String, String)> = users
            .iter()
            .flat_map(|u| {
                u.numbers
                    .iter()
                    .map(String::as_str)
                    .chain(u.get(UserField::PrivateNumber))
                    .map(|n| (n.to_string(), u.extension.clone()))
            })
            .filter(|(n, _)| given.iter().any(|(g, _)| g == n))
            .collect();
        let mut movers = HashSet::new();
        add_movers(&given, &holders, &mut movers);
        let movers = Arc::new(movers);
        let mut refusal = None;
        loop {
            let moving = users
                .iter()
                .filter(|u| movers.contains(&u.extension))
                .cloned()
                .collect();
            let mut planner = RowsPlanner::new(
                rules.clone(),
                requests.rows().map(|(r, _)| r),
                movers.clone(),
                moving,
                refusal.clone(),
            )
            .unwrap();
            let all: Vec<RowRequest> = requests.rows().map(|(r, _)| r).collect();
            let (mut rows, mut donors) = (vec![], vec![]);
            for (c, part) in all.chunks(chunk).enumerate() {
                let mut dir = Directory::untracked(
                    users
                        .iter()
                        .filter(|u| {
                            !movers.contains(&u.extension)
                                && part.iter().any(|r| r.extension == u.extension)
                        })
                        .cloned(),
                );
                for (k, req) in part.iter().enumerate() {
                    let i = c * chunk + k;
                    let (row, gives) = planner.next(i, req.clone(), &mut dir);
                    rows.push(row);
                    donors.extend(gives.into_iter().map(|d| (i, d)));
                }
            }
            let (hash, tally) = planner.finish();
            match tally
                .atomic_refusal()
                .filter(|_| atomic && refusal.is_none())
            {
                Some(why) => refusal = Some(why),
                None => {
                    return Planned {
                        rows,
                        donors,
                        hash,
                        tally,
                    };
                }
            }
        }
    }

    fn plan(csv: &str, users: Vec<User>, atomic: bool) -> Planned {
        plan_chunked(csv, users, atomic, 2)
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
            [(
                0,
                Donor {
                    extension: "202".into(),
                    number: "+15550200202".into()
                }
            )]
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

    fn mixed_file() -> (&'static str, Vec<User>) {
        let csv = "extension,primaryNumber,privateNumber,callerIdPolicy\n\
                   201,,,Anonymous\n\
                   204,,+15550200210,Anonymous\n\
                   205,+15550100202,,\n\
                   202,+15550100201,,\n\
                   206,,+15550200202,\n\
                   999,,,Anonymous\n\
                   207,,,Secret\n\
                   208,+15550100299,,Anonymous\n\
                   203,+15550100209,,\n\
                   211,,,Anonymous\n";
        let mut users = users();
        for e in ["204", "205", "206", "207", "208", "209", "211"] {
            users.push(user(e, Some(&format!("+15550100{e}")), None));
        }
        users.push(user("210", None, Some("+15550200210")));
        (csv, users)
    }

    #[test]
    fn planning_a_chunk_at_a_time_makes_the_plan_of_the_whole_file() {
        let (csv, users) = mixed_file();
        // Every user a mover: the whole file planned in one pass against every user.
        let s = sheet::read(csv.as_bytes(), DEFAULT_MAX_BYTES).unwrap();
        let base = Intent::default();
        let rules = Rules {
            base: &base,
            policies: policies(),
            supported: UserField::ALL.to_vec(),
            atomic: false,
        };
        let everyone: Arc<HashSet<String>> =
            Arc::new(users.iter().map(|u| u.extension.clone()).collect());
        let requests: Vec<RowRequest> = sheet::requests(&s, &[]).collect();
        let mut whole = RowsPlanner::new(
            rules.clone(),
            requests.clone(),
            everyone,
            users.clone(),
            None,
        )
        .unwrap();
        let mut rows = vec![];
        let mut donors = vec![];
        for (i, r) in requests.into_iter().enumerate() {
            let (row, gives) = whole.next(i, r, &mut Directory::default());
            rows.push(row);
            donors.extend(gives.into_iter().map(|d| (i, d)));
        }
        let (hash, _) = whole.finish();
        let donors_to: Vec<(usize, &str)> = donors
            .iter()
            .map(|(i, d)| (*i, d.extension.as_str()))
            .collect();
        assert_eq!(donors_to, [(1, "210"), (8, "209")]);
        for chunk in [1, 2, 3, 100] {
            let p = plan_chunked(csv, users.clone(), false, chunk);
            assert_eq!(p.rows, rows, "chunk {chunk}");
            assert_eq!(p.donors, donors, "chunk {chunk}");
            assert_eq!(p.hash, hash, "chunk {chunk}");
        }
    }

    #[test]
    fn a_holder_whose_row_comes_first_is_told_of_the_move() {
        let (csv, users) = mixed_file();
        let p = plan(csv, users, false);
        // 201 keeps its number on line 2; 202 takes it on line 5 (after giving its own to 205).
        assert!(
            p.rows[0]
                .warnings
                .iter()
                .any(|w| w.contains("moves from this user to 202 (CSV line 5)")),
            "{:?}",
            p.rows[0].warnings
        );
        assert_eq!(p.rows[3].takes[0].holder, "201");
        assert_eq!(p.rows[2].takes[0].holder, "202");
        assert!(
            p.rows[9].takes.is_empty() && p.rows[9].warnings.is_empty(),
            "211 moves nothing"
        );
    }

    #[test]
    fn a_number_someone_took_since_the_movers_were_read_refuses_the_row() {
        let base = Intent::default();
        let rules = Rules {
            base: &base,
            policies: policies(),
            supported: UserField::ALL.to_vec(),
            atomic: false,
        };
        let req = RowRequest {
            line: 2,
            extension: "203".into(),
            values: vec![(UserField::PrimaryNumber, "+15550100201".into())],
            ..Default::default()
        };
        let mut planner =
            RowsPlanner::new(rules, [req.clone()], Arc::default(), vec![], None).unwrap();
        let mut dir = Directory::untracked(users());
        let (row, donors) = planner.next(0, req, &mut dir);
        assert!(row.writes.is_empty() && row.takes.is_empty() && donors.is_empty());
        assert!(
            row.errors[0].contains("is held by 201 now")
                && row.errors[0].contains("validate again"),
            "{:?}",
            row.errors
        );
        assert_eq!(planner.finish().1.invalid, 1);
    }
}
