-- A record some attempt may have delivered without its answer being recorded (a crash after sending,
-- a timeout, a lost answer). A later definitive refusal does not undo that, so such a record is never
-- carried to another hour when its window closes: it needs a person to check the marketplace.
ALTER TABLE ledger ADD COLUMN IF NOT EXISTS unconfirmed boolean NOT NULL DEFAULT false;
