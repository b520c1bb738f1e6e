-- Users, refresh tokens (stored as hashes only) and the signing key shared by every
-- auth instance. gen_random_uuid() is built in since PostgreSQL 13.

CREATE TABLE users (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email text NOT NULL,
    name text NOT NULL,
    password_hash text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- Emails are stored lower-cased; the index also guards against a caller that forgets.
CREATE UNIQUE INDEX users_email_key ON users (lower(email));

CREATE TABLE refresh_tokens (
    token_hash text PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id);

CREATE TABLE signing_keys (
    kid text PRIMARY KEY,
    private_pem text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Failed logins in fixed windows, per account and per client address, shared by every
-- instance so that scaling auth does not multiply the allowance.
CREATE TABLE login_failures (
    subject text NOT NULL,          -- 'email:<address>' or 'ip:<address>'
    window_start timestamptz NOT NULL,
    failures integer NOT NULL,
    PRIMARY KEY (subject, window_start)
);
