-- pbx-operator's own table: phone provisioning (Kamailio itself has no notion of a device).
CREATE TABLE IF NOT EXISTS pbx_phone (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    mac VARCHAR(17) NOT NULL,
    vendor VARCHAR(64) NOT NULL,
    model VARCHAR(64) NOT NULL,
    owner_username VARCHAR(64),
    domain VARCHAR(64) NOT NULL,
    label VARCHAR(128),
    CONSTRAINT pbx_phone_mac_idx UNIQUE (mac)
);
CREATE INDEX IF NOT EXISTS pbx_phone_owner_idx ON pbx_phone (domain, owner_username);

-- pbx-operator's own table: the policy catalogue (caller ID and voice route policies a user may
-- be given). kind is callerId or voiceRoute, and domain '' applies to every tenant.
CREATE TABLE IF NOT EXISTS pbx_policy (
    kind VARCHAR(32) NOT NULL,
    name VARCHAR(64) NOT NULL,
    domain VARCHAR(64) DEFAULT '' NOT NULL,
    description VARCHAR(255),
    CONSTRAINT pbx_policy_idx UNIQUE (domain, kind, name)
);
