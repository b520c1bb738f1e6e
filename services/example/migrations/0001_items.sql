-- Items owned by users. owner_id is auth's user id: a reference to another service's data,
-- so there is no foreign key (a service never reaches into another's database).
CREATE TABLE items (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    owner_id    uuid NOT NULL,
    title       text NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
    description text NOT NULL DEFAULT '' CHECK (length(description) <= 5000),
    price_cents bigint NOT NULL DEFAULT 0 CHECK (price_cents >= 0),
    tags        text[] NOT NULL DEFAULT '{}' CHECK (cardinality(tags) <= 20),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- The list order (newest first, id as tie-breaker), overall and per owner.
CREATE INDEX items_newest ON items (created_at DESC, id);
CREATE INDEX items_owner_newest ON items (owner_id, created_at DESC, id);
-- `tags @> ARRAY[tag]` filtering.
CREATE INDEX items_tags ON items USING gin (tags);
