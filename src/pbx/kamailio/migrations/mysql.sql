-- pbx-operator's own table: phone provisioning (Kamailio itself has no notion of a device).
CREATE TABLE IF NOT EXISTS pbx_phone (
    id INT(10) UNSIGNED AUTO_INCREMENT PRIMARY KEY NOT NULL,
    mac VARCHAR(17) NOT NULL,
    vendor VARCHAR(64) NOT NULL,
    model VARCHAR(64) NOT NULL,
    owner_username VARCHAR(64),
    domain VARCHAR(64) NOT NULL,
    label VARCHAR(128),
    CONSTRAINT pbx_phone_mac_idx UNIQUE (mac),
    INDEX pbx_phone_owner_idx (domain, owner_username)
);

-- pbx-operator's own table: the policy catalogue (caller ID and voice route policies a user may
-- be given). kind is callerId or voiceRoute, and domain '' applies to every tenant.
CREATE TABLE IF NOT EXISTS pbx_policy (
    kind VARCHAR(32) NOT NULL,
    name VARCHAR(64) NOT NULL,
    domain VARCHAR(64) DEFAULT '' NOT NULL,
    description VARCHAR(255),
    CONSTRAINT pbx_policy_idx UNIQUE (domain, kind, name)
);

-- pbx-operator's own tables: the run ledger. One row per executed run of an operation (kind,
-- namespace, name, spec hash), and its journal's batches, so that a cluster rebuilt from Git
-- neither runs a change again nor starts an interrupted one over.
CREATE TABLE IF NOT EXISTS pbx_ledger (
    id VARCHAR(64) PRIMARY KEY NOT NULL,
    domain VARCHAR(64) NOT NULL,
    kind VARCHAR(32) NOT NULL,
    namespace VARCHAR(253) NOT NULL,
    name VARCHAR(253) NOT NULL,
    uid VARCHAR(64) NOT NULL,
    spec_hash VARCHAR(64) NOT NULL,
    plan_hash VARCHAR(64) NOT NULL,
    requested_by VARCHAR(253),
    started BIGINT NOT NULL,
    finished BIGINT,
    phase VARCHAR(32),
    targets INT DEFAULT 0 NOT NULL,
    changed INT DEFAULT 0 NOT NULL,
    failed INT DEFAULT 0 NOT NULL,
    uncertain INT DEFAULT 0 NOT NULL,
    summary TEXT,
    batches INT DEFAULT 0 NOT NULL,
    plan MEDIUMTEXT NOT NULL,
    INDEX pbx_ledger_key_idx (namespace(64), name(64), kind, spec_hash)
) DEFAULT CHARSET = utf8mb4;

CREATE TABLE IF NOT EXISTS pbx_ledger_batch (
    ledger_id VARCHAR(64) NOT NULL,
    idx INT NOT NULL,
    journal MEDIUMTEXT NOT NULL,
    PRIMARY KEY (ledger_id, idx)
) DEFAULT CHARSET = utf8mb4;

-- pbx-operator's own table: snapshots of users a Remove or a UserRecycle took away, without
-- credentials, kept under the run that took them (its ledger id) so a revert can bring them
-- back. data is JSON, deleted (NULL, expired set) after the PbxConnection's retention.
-- restored_by: the run that last restored the user from it (a resumed restore is not redone).
CREATE TABLE IF NOT EXISTS pbx_snapshot (
    run VARCHAR(64) NOT NULL,
    domain VARCHAR(64) NOT NULL,
    username VARCHAR(64) NOT NULL,
    taken BIGINT NOT NULL,
    data MEDIUMTEXT,
    expired BIGINT,
    restored_by VARCHAR(64),
    PRIMARY KEY (run, domain, username),
    INDEX pbx_snapshot_taken_idx (taken)
) DEFAULT CHARSET = utf8mb4;

-- The index on Kamailio's usr_preferences by value (private numbers) is created by the
-- operator (Db::index_number_holders), which first looks whether it exists: MySQL has no
-- CREATE INDEX IF NOT EXISTS.
