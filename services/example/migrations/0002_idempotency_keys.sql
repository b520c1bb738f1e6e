-- Idempotency-Key of item creations: a repeated key (a client's retry, or the gateway's
-- after an instance died mid-request) answers the first outcome instead of creating a
-- second item. Kept for a day (services/example/storage.py purges older keys).
CREATE TABLE idempotency_keys (
    owner_id    uuid NOT NULL,
    key         text NOT NULL,
    fingerprint bytea NOT NULL,   -- sha256 of the request as decoded: a reuse for another request is refused
    response    bytea,            -- the created item (JSON), set in the same transaction
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner_id, key)
);
CREATE INDEX idempotency_keys_age ON idempotency_keys (created_at);
