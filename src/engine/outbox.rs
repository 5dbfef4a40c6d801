//! Mail for every kind: one letter per target, sent a flight at a time. Each flight's mail steps
//! are recorded as intended before any of it is sent and with their outcomes after, so a crash
//! leaves at most one flight uncertain (a mail cannot be observed: it is never sent twice on its
//! own).

use super::{At, Batch, Ended, Error, Journal, set};
use crate::mail::Mailer;
use crate::plan::stored::{Row, StepKind, StepState};

/// Mails sent between two records: a crash leaves at most this many uncertain.
pub const MAIL_FLIGHT: usize = 20;

/// Where mail goes: the connection's SMTP relay ([`Mailer`]).
#[async_trait::async_trait]
pub trait Outbox: Send + Sync {
    async fn send(&self, to: &str, subject: &str, body: String) -> Result<(), String>;
}

#[async_trait::async_trait]
impl Outbox for Mailer {
    async fn send(&self, to: &str, subject: &str, body: String) -> Result<(), String> {
        Mailer::send(self, to, subject, body)
            .await
            .map_err(|e| e.to_string())
    }
}

/// One mail, ready to go.
pub struct Letter {
    pub to: String,
    pub subject: String,
    pub body: String,
}

/// How a kind sends its mail: the steps, the relay, and what people read of each outcome.
pub struct Flights<'a> {
    pub kind: StepKind,
    /// None: the connection has no usable SMTP, and each mail fails saying so.
    pub outbox: Option<&'a dyn Outbox>,
    pub journal: &'a dyn Journal,
    /// Asked before each flight: true once the operator is stopping.
    pub stopping: &'a (dyn Fn() -> bool + Sync),
}

/// Sends the `kind` mail of the rows at `due`, a flight at a time. `letter` writes a row's mail,
/// or says why it cannot go (that step fails); `note` is what people read of each outcome.
pub async fn send_in_flights(
    flights: Flights<'_>,
    batches: &mut [Batch],
    due: &[At],
    letter: impl Fn(&Row) -> Result<Letter, String>,
    note: impl Fn(Result<(), &str>) -> String,
) -> Result<Ended, Error> {
    let kind = flights.kind;
    for flight in due.chunks(MAIL_FLIGHT) {
        if (flights.stopping)() {
            super::save(flights.journal, batches).await?;
            return Ok(Ended::Stopped);
        }
        for &(b, i) in flight {
            set(&mut batches[b], i, kind, StepState::Intended);
        }
        super::save(flights.journal, batches).await?;
        let sends = flight.iter().map(|&(b, i)| {
            let letter = letter(&batches[b].rows[i]);
            async move {
                let letter = letter?;
                let Some(outbox) = flights.outbox else {
                    return Err("the PbxConnection has no usable spec.smtp: not sent".to_string());
                };
                outbox.send(&letter.to, &letter.subject, letter.body).await
            }
        });
        let sent = futures::future::join_all(sends).await;
        for (&(b, i), result) in flight.iter().zip(sent) {
            let state = match &result {
                Ok(()) => StepState::Done,
                Err(_) => StepState::Failed,
            };
            let batch = &mut batches[b];
            set(batch, i, kind, state);
            batch.rows[i]
                .notes
                .push(note(result.as_ref().map(|_| ()).map_err(String::as_str)));
        }
        super::save(flights.journal, batches).await?;
    }
    Ok(Ended::Finished)
}
