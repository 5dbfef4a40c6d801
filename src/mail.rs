//! Mail to users (password reset instructions, welcome), through the connection's SMTP relay.
//! Messages never carry a secret: they say what happened and where to go next.

use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::api::connection::{SmtpSettings, SmtpTls};
use crate::pbx::Secret;

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("the SMTP settings are not usable: {0}; fix spec.smtp of the PbxConnection")]
    Config(String),
    #[error("{address:?} is not a valid email address; fix the user's email field")]
    BadAddress { address: String },
    #[error("the SMTP relay did not take the message: {0}")]
    Send(String),
}

pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Mailer {
    pub fn new(
        settings: &SmtpSettings,
        credentials: Option<(String, Secret)>,
    ) -> Result<Mailer, MailError> {
        crate::tls::install_crypto_provider();
        let from: Mailbox = settings
            .from
            .parse()
            .map_err(|e| MailError::Config(format!("from address: {e}")))?;
        let mut builder = match settings.tls {
            SmtpTls::None => {
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&settings.host)
            }
            SmtpTls::StartTls => {
                AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&settings.host)
                    .map_err(|e| MailError::Config(e.to_string()))?
            }
            SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&settings.host)
                .map_err(|e| MailError::Config(e.to_string()))?,
        };
        if let Some(port) = settings.port {
            builder = builder.port(port);
        }
        if let Some((user, password)) = credentials {
            builder = builder.credentials(Credentials::new(user, password.expose().to_string()));
        }
        builder = builder.timeout(Some(std::time::Duration::from_secs(20)));
        Ok(Mailer {
            transport: builder.build(),
            from,
        })
    }

    pub async fn send(&self, to: &str, subject: &str, body: String) -> Result<(), MailError> {
        let to: Mailbox = to.parse().map_err(|_| MailError::BadAddress {
            address: to.to_string(),
        })?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .body(body)
            .map_err(|e| MailError::Config(e.to_string()))?;
        self.transport
            .send(message)
            .await
            .map_err(|e| MailError::Send(e.to_string()))?;
        Ok(())
    }
}

/// What a user whose password was reset receives: the fact, and what to do. No secret.
pub fn reset_instructions(extension: &str, name: &str, domain: &str) -> (String, String) {
    let greeting = if name.trim().is_empty() {
        "Hello".to_string()
    } else {
        format!("Hello {name}")
    };
    (
        format!("Your phone password for extension {extension} was reset"),
        format!(
            "{greeting},\n\nthe SIP password of your extension {extension} on {domain} was reset by your \
administrator. Your phones will ask you to sign in again.\n\nSet a new password in the self-care portal \
or ask your administrator for a provisioning code. Nobody will ever send you the password by email.\n"
        ),
    )
}

/// The welcome message for a new person on an extension. No secret.
pub fn welcome(extension: &str, first_name: &str, domain: &str) -> (String, String) {
    (
        format!("Welcome: your phone extension is {extension}"),
        format!(
            "Hello {first_name},\n\nyou now have extension {extension} on {domain}.\n\nBefore your first call, \
set your password and voicemail PIN in the self-care portal; until then your extension shows \
Password Required.\n"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_extension_and_hold_no_secret() {
        let (subject, body) = reset_instructions("201", "Ana", "pbx.test");
        assert!(subject.contains("201") && body.contains("201"));
        let (subject, body) = welcome("212", "Ana", "pbx.test");
        assert!(subject.contains("212") && body.contains("Ana"));
    }
}
