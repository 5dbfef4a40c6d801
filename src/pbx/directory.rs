//! Users and the numbers they hold, as changes apply one after another. A number belongs to one
//! user at a time: giving it to someone takes it from whoever held it. The planner replays a
//! CSV through this to show each row's diff against the state the rows before it leave, and the
//! Kamailio backend replays a batch through it inside its transaction, so both agree.

use std::collections::HashMap;

use super::{NewValue, User, UserField};

/// A number taken from its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub number: String,
    /// Who held it.
    pub holder: String,
    /// How the holder held it: PrimaryNumber (any of its routing numbers) or PrivateNumber.
    pub held_as: UserField,
}

/// Users by extension, with an index of who holds which number.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    users: HashMap<String, User>,
    holders: HashMap<String, String>,
    /// Users as they were before their first change, to write only what differs.
    originals: HashMap<String, User>,
    /// Whether to keep `originals` (a writer needs them; a planner does not).
    track: bool,
}

impl Directory {
    /// A directory that remembers each changed user's first state, for [`Directory::changed`].
    pub fn new(users: impl IntoIterator<Item = User>) -> Directory {
        let mut d = Directory::untracked(users);
        d.track = true;
        d
    }

    /// A directory for planning only: no copies of changed users are kept.
    pub fn untracked(users: impl IntoIterator<Item = User>) -> Directory {
        let mut d = Directory::default();
        for u in users {
            for n in u
                .numbers
                .iter()
                .map(String::as_str)
                .chain(u.get(UserField::PrivateNumber))
            {
                d.holders.insert(n.to_string(), u.extension.clone());
            }
            d.users.insert(u.extension.clone(), u);
        }
        d
    }

    pub fn get(&self, extension: &str) -> Option<&User> {
        self.users.get(extension)
    }

    /// Every changed user: as it was, and as it is now.
    pub fn changed(&self) -> impl Iterator<Item = (&User, &User)> {
        self.originals
            .iter()
            .filter_map(|(e, before)| self.users.get(e).map(|now| (before, now)))
    }

    fn remember(&mut self, extension: &str) {
        if self.track
            && !self.originals.contains_key(extension)
            && let Some(u) = self.users.get(extension)
        {
            self.originals.insert(extension.to_string(), u.clone());
        }
    }

    /// Who other than `extension` holds `number`.
    pub fn holder_other_than(&self, number: &str, extension: &str) -> Option<&str> {
        self.holders
            .get(number)
            .map(String::as_str)
            .filter(|h| *h != extension)
    }

    /// Sets `field` of `extension` (canonical value, or a secret's stored fingerprint), taking a
    /// number from whoever else holds it. Returns the moves it made.
    pub fn set(&mut self, extension: &str, field: UserField, value: Option<&str>) -> Vec<Move> {
        let mut moves = Vec::new();
        if let Some(n) = value.filter(|_| field.is_number())
            && let Some(holder) = self.holder_other_than(n, extension).map(str::to_string)
        {
            moves.push(self.take(n, &holder));
        }
        self.remember(extension);
        let Some(user) = self.users.get_mut(extension) else {
            return moves;
        };
        match field {
            UserField::PrimaryNumber => {
                if let Some(old) = user.numbers.first().cloned() {
                    user.numbers.remove(0);
                    if user.get(UserField::PrivateNumber) != Some(old.as_str()) {
                        self.holders.remove(&old);
                    }
                }
                if let Some(n) = value {
                    user.numbers.retain(|x| x != n);
                    user.numbers.insert(0, n.to_string());
                    self.holders.insert(n.to_string(), extension.to_string());
                }
                match user.numbers.first() {
                    Some(p) => user.values.insert(field, p.clone()),
                    None => user.values.remove(&field),
                };
            }
            UserField::PrivateNumber => {
                if let Some(old) = user.values.remove(&field)
                    && !user.numbers.contains(&old)
                {
                    self.holders.remove(&old);
                }
                if let Some(n) = value {
                    user.values.insert(field, n.to_string());
                    self.holders.insert(n.to_string(), extension.to_string());
                }
            }
            _ => {
                match value {
                    Some(v) => user.values.insert(field, v.to_string()),
                    None => user.values.remove(&field),
                };
            }
        }
        moves
    }

    /// Applies a write's new value; secrets are stored as `fingerprint` gives them.
    pub fn apply(
        &mut self,
        extension: &str,
        field: UserField,
        to: &NewValue,
        fingerprint: &dyn Fn(&str, UserField, &super::Secret) -> String,
    ) -> Vec<Move> {
        match to {
            NewValue::Set(v) => self.set(extension, field, Some(v)),
            NewValue::Clear => self.set(extension, field, None),
            NewValue::Secret(s) => {
                let stored = fingerprint(extension, field, s);
                self.set(extension, field, Some(&stored))
            }
        }
    }

    fn take(&mut self, number: &str, holder: &str) -> Move {
        self.holders.remove(number);
        self.remember(holder);
        let mut held_as = UserField::PrimaryNumber;
        if let Some(h) = self.users.get_mut(holder) {
            if let Some(i) = h.numbers.iter().position(|x| x == number) {
                h.numbers.remove(i);
                if i == 0 {
                    // The location described the number that left.
                    h.values.remove(&UserField::PrimaryNumberLocation);
                }
                match h.numbers.first() {
                    Some(p) => h.values.insert(UserField::PrimaryNumber, p.clone()),
                    None => h.values.remove(&UserField::PrimaryNumber),
                };
            }
            if h.get(UserField::PrivateNumber) == Some(number) {
                held_as = UserField::PrivateNumber;
                h.values.remove(&UserField::PrivateNumber);
                h.values.remove(&UserField::PrivateNumberLocation);
            }
        }
        Move {
            number: number.to_string(),
            holder: holder.to_string(),
            held_as,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(ext: &str, numbers: &[&str], private: Option<&str>) -> User {
        let mut u = User {
            extension: ext.into(),
            numbers: numbers.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        if let Some(p) = numbers.first() {
            u.values.insert(UserField::PrimaryNumber, p.to_string());
            u.values
                .insert(UserField::PrimaryNumberLocation, "Berlin".into());
        }
        if let Some(p) = private {
            u.values.insert(UserField::PrivateNumber, p.into());
            u.values
                .insert(UserField::PrivateNumberLocation, "London".into());
        }
        u
    }

    #[test]
    fn giving_a_primary_number_takes_it_from_its_holder() {
        let mut d = Directory::new([
            user("201", &["+15550000201"], None),
            user("205", &["+15550000205", "+15550009205"], None),
        ]);
        let moves = d.set("201", UserField::PrimaryNumber, Some("+15550000205"));
        assert_eq!(
            moves,
            [Move {
                number: "+15550000205".into(),
                holder: "205".into(),
                held_as: UserField::PrimaryNumber
            }]
        );
        let a = d.get("201").unwrap();
        assert_eq!(a.numbers, ["+15550000205"], "the old primary is replaced");
        let b = d.get("205").unwrap();
        assert_eq!(b.get(UserField::PrimaryNumber), Some("+15550009205"));
        assert_eq!(b.get(UserField::PrimaryNumberLocation), None);
        assert_eq!(d.holder_other_than("+15550000201", "x"), None);
        assert_eq!(d.holder_other_than("+15550000205", "x"), Some("201"));
        assert_eq!(d.changed().count(), 2, "both users changed");
    }

    #[test]
    fn a_private_number_moves_with_its_location() {
        let mut d = Directory::new([
            user("201", &[], None),
            user("203", &["+15550000203"], Some("+15550200203")),
        ]);
        let moves = d.set("201", UserField::PrimaryNumber, Some("+15550200203"));
        assert_eq!(moves[0].held_as, UserField::PrivateNumber);
        let h = d.get("203").unwrap();
        assert_eq!(h.get(UserField::PrivateNumber), None);
        assert_eq!(h.get(UserField::PrivateNumberLocation), None);
        assert_eq!(h.get(UserField::PrimaryNumber), Some("+15550000203"));
    }

    #[test]
    fn swapping_two_numbers_in_order_needs_no_third() {
        let mut d = Directory::new([
            user("201", &["+15550000201"], None),
            user("202", &["+15550000202"], None),
        ]);
        d.set("201", UserField::PrimaryNumber, Some("+15550000202"));
        // 201's old number was released by the first write: nobody holds it now.
        assert_eq!(d.holder_other_than("+15550000201", "202"), None);
        let moves = d.set("202", UserField::PrimaryNumber, Some("+15550000201"));
        assert!(moves.is_empty());
        assert_eq!(
            d.get("202").unwrap().get(UserField::PrimaryNumber),
            Some("+15550000201")
        );
    }

    #[test]
    fn plain_fields_set_and_clear() {
        let mut d = Directory::new([user("201", &[], None)]);
        d.set("201", UserField::CallerIdPolicy, Some("Anonymous"));
        assert_eq!(
            d.get("201").unwrap().get(UserField::CallerIdPolicy),
            Some("Anonymous")
        );
        d.set("201", UserField::CallerIdPolicy, None);
        assert_eq!(d.get("201").unwrap().get(UserField::CallerIdPolicy), None);
    }
}
