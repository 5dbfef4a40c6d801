//! Reset and recycle (UserRecycle) in Kamailio's tables, one transaction per user.
//!
//! What each reset part clears (see `schema.rs` for where fields live):
//!
//! | part | storage |
//! |---|---|
//! | Name | `usr_preferences` `pbx.first_name`, `pbx.last_name` deleted |
//! | Email | `pbx.email` deleted |
//! | Password | `subscriber.ha1` / `ha1b` rotated to a random secret nobody is told |
//! | VoicemailPin | `pbx.voicemail_pin` deleted |
//! | Devices | `pbx_phone` rows owned by the user get `owner_username = NULL`: the phone stays in the inventory (MAC, vendor, model, label kept) and can be given to someone else |
//! | Role | `pbx.role` deleted |
//! | Groups | every `grp` row of the user deleted |
//! | Numbers | every `dbaliases` row of the user deleted, plus `pbx.primary_number_location`, `pbx.private_number`, `pbx.private_number_location` |
//! | CallGroup, PickupGroup | `pbx.call_group`, `pbx.pickup_group` deleted |
//!
//! Every reset sets `pbx.status` to SetupRequired; nothing else of the user is touched. A recycle
//! sets `pbx.first_name`, `pbx.last_name`, `pbx.email` (deleted when the new person has none),
//! rotates the HA1 again, deletes `pbx.voicemail_pin` and sets `pbx.status` PasswordRequired.

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::db::Db;

type Tx = sqlx::Transaction<'static, sqlx::Any>;
use super::schema::{self, Storage};
use crate::pbx::{
    NewIdentity, Phone, ResetOutcome, ResetPart, Result, Secret, User, UserField, UserReset,
    UserSelection,
};

/// Status a reset user has: the extension waits for a new person.
pub const SETUP_REQUIRED: &str = "SetupRequired";
/// Status a recycled user has: the new person must set a password and PIN first.
pub const PASSWORD_REQUIRED: &str = "PasswordRequired";

fn attribute(field: UserField) -> &'static str {
    match schema::storage(field) {
        Storage::Attribute(a) => a,
        other => unreachable!("{field} is stored as {other:?}, not as an attribute"),
    }
}

/// The `usr_preferences` attributes a reset part deletes.
pub fn attributes(part: ResetPart) -> Vec<&'static str> {
    use UserField as F;
    let fields: &[UserField] = match part {
        ResetPart::Name => &[F::FirstName, F::LastName],
        ResetPart::Email => &[F::Email],
        ResetPart::VoicemailPin => &[F::VoicemailPin],
        ResetPart::Role => &[F::Role],
        ResetPart::CallGroup => &[F::CallGroup],
        ResetPart::PickupGroup => &[F::PickupGroup],
        ResetPart::Numbers => &[
            F::PrimaryNumberLocation,
            F::PrivateNumber,
            F::PrivateNumberLocation,
        ],
        ResetPart::Password | ResetPart::Devices | ResetPart::Groups => &[],
    };
    fields.iter().map(|f| attribute(*f)).collect()
}

impl Db {
    /// Resets each user in its own transaction. A database that goes away fails the call (the
    /// caller retries; a reset done twice clears nothing more); anything else fails that user.
    pub async fn reset_users(&self, resets: &[UserReset]) -> Result<Vec<ResetOutcome>> {
        let mut outcomes = Vec::with_capacity(resets.len());
        for reset in resets {
            let Some((mut tx, before)) = self.begin_for(&reset.extension).await? else {
                outcomes.push(ResetOutcome::NotFound);
                continue;
            };
            let result = self.reset_on(&mut tx, &before, &reset.parts).await;
            outcomes.push(self.finish(tx, before, result).await?);
        }
        Ok(outcomes)
    }

    /// Gives each extension to its new person, each in its own transaction.
    pub async fn recycle_users(&self, identities: &[NewIdentity]) -> Result<Vec<ResetOutcome>> {
        let mut outcomes = Vec::with_capacity(identities.len());
        for identity in identities {
            let Some((mut tx, before)) = self.begin_for(&identity.extension).await? else {
                outcomes.push(ResetOutcome::NotFound);
                continue;
            };
            let result = self.recycle_on(&mut tx, identity).await;
            outcomes.push(self.finish(tx, before, result).await?);
        }
        Ok(outcomes)
    }

    /// Opens a transaction and reads the user in it; None when the user does not exist.
    async fn begin_for(&self, extension: &str) -> Result<Option<(Tx, User)>> {
        let mut tx = self.begin().await.map_err(|e| self.err(e))?;
        let selection = UserSelection {
            groups: vec![],
            extensions: vec![extension.to_string()],
        };
        let user = self
            .read_users_on(&mut tx, &selection)
            .await?
            .users
            .into_iter()
            .next();
        Ok(user.map(|u| (tx, u)))
    }

    /// Commits what went through; rolls back (drops) what did not. A database that went away
    /// fails the whole call, anything else only this user.
    async fn finish(
        &self,
        tx: Tx,
        before: User,
        result: Result<Vec<Phone>>,
    ) -> Result<ResetOutcome> {
        match result {
            Ok(unassigned) => {
                tx.commit().await.map_err(|e| self.err(e))?;
                Ok(ResetOutcome::Done { before, unassigned })
            }
            Err(e) if e.is_transient() => Err(e),
            Err(e) => Ok(ResetOutcome::Failed(e.to_string())),
        }
    }

    async fn reset_on(
        &self,
        conn: &mut AnyConnection,
        user: &User,
        parts: &[ResetPart],
    ) -> Result<Vec<Phone>> {
        let ext = user.extension.as_str();
        let attributes: Vec<&str> = parts.iter().flat_map(|p| attributes(*p)).collect();
        if !attributes.is_empty() {
            let list: Vec<String> = (0..attributes.len())
                .map(|i| format!("${}", 3 + i))
                .collect();
            let q = format!(
                "DELETE FROM usr_preferences WHERE domain = $1 AND username = $2 AND attribute IN ({})",
                list.join(", ")
            );
            let mut query = sqlx::query(self.sql(&q)).bind(self.domain()).bind(ext);
            for a in &attributes {
                query = query.bind(*a);
            }
            query.execute(&mut *conn).await.map_err(|e| self.err(e))?;
        }
        if parts.contains(&ResetPart::Password) {
            self.set_password(conn, ext, &Secret::generate()).await?;
        }
        if parts.contains(&ResetPart::Groups) {
            self.delete_user_rows(
                conn,
                "DELETE FROM grp WHERE domain = $1 AND username = $2",
                ext,
            )
            .await?;
        }
        if parts.contains(&ResetPart::Numbers) {
            self.delete_user_rows(
                conn,
                "DELETE FROM dbaliases WHERE domain = $1 AND username = $2",
                ext,
            )
            .await?;
        }
        let mut unassigned = Vec::new();
        if parts.contains(&ResetPart::Devices) {
            let q = "SELECT id, mac, vendor, model, owner_username, label FROM pbx_phone WHERE domain = $1 AND owner_username = $2 ORDER BY id";
            let rows = sqlx::query(self.sql(q))
                .bind(self.domain())
                .bind(ext)
                .fetch_all(&mut *conn)
                .await
                .map_err(|e| self.err(e))?;
            for row in &rows {
                unassigned.push(phone(row).map_err(|e| self.err(e))?);
            }
            self.delete_user_rows(
                conn,
                "UPDATE pbx_phone SET owner_username = NULL WHERE domain = $1 AND owner_username = $2",
                ext,
            )
            .await?;
        }
        self.replace_attribute(
            conn,
            attribute(UserField::Status),
            &[(ext, Some(SETUP_REQUIRED.to_string()))],
        )
        .await?;
        Ok(unassigned)
    }

    async fn recycle_on(
        &self,
        conn: &mut AnyConnection,
        identity: &NewIdentity,
    ) -> Result<Vec<Phone>> {
        let ext = identity.extension.as_str();
        for (field, value) in [
            (UserField::FirstName, Some(identity.first_name.clone())),
            (UserField::LastName, Some(identity.last_name.clone())),
            (UserField::Email, identity.email.clone()),
            (UserField::VoicemailPin, None),
            (UserField::Status, Some(PASSWORD_REQUIRED.to_string())),
        ] {
            self.replace_attribute(conn, attribute(field), &[(ext, value)])
                .await?;
        }
        // A secret nobody knows: the new person sets their own through the self-care portal.
        self.set_password(conn, ext, &Secret::generate()).await?;
        Ok(vec![])
    }

    async fn delete_user_rows(&self, conn: &mut AnyConnection, q: &str, ext: &str) -> Result<u64> {
        Ok(sqlx::query(self.sql(q))
            .bind(self.domain())
            .bind(ext)
            .execute(&mut *conn)
            .await
            .map_err(|e| self.err(e))?
            .rows_affected())
    }
}

fn text(row: &AnyRow, i: usize) -> Result<String, sqlx::Error> {
    Ok(row.try_get::<Option<String>, _>(i)?.unwrap_or_default())
}

fn phone(row: &AnyRow) -> Result<Phone, sqlx::Error> {
    let id = row
        .try_get::<i64, _>(0)
        .or_else(|_| row.try_get::<i32, _>(0).map(i64::from))?;
    let owner = text(row, 4)?;
    let label = text(row, 5)?;
    Ok(Phone {
        id,
        mac: text(row, 1)?,
        vendor: text(row, 2)?,
        model: text(row, 3)?,
        owner: (!owner.is_empty()).then_some(owner),
        label: (!label.is_empty()).then_some(label),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_names_its_storage() {
        assert_eq!(
            attributes(ResetPart::Name),
            ["pbx.first_name", "pbx.last_name"]
        );
        assert_eq!(
            attributes(ResetPart::Numbers),
            [
                "pbx.primary_number_location",
                "pbx.private_number",
                "pbx.private_number_location"
            ]
        );
        assert_eq!(attributes(ResetPart::VoicemailPin), ["pbx.voicemail_pin"]);
        assert!(attributes(ResetPart::Devices).is_empty());
    }
}
