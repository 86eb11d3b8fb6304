-- How many of a row's attempts (the decision's and each later claim's) ended in an answer proving the
-- marketplace did not take the record: throttled, unavailable, unprocessed, out of its window, or never
-- connected. Only a row whose every attempt was refused may expire and give its quantity back to the carry;
-- any other may be held by the marketplace. Rows written before this column have 0: they cannot be proven
-- refused, so an unfinished one is no longer carried when its window closes, and `billing reconcile` flags
-- an expired one as possibly received.
ALTER TABLE ledger ADD COLUMN IF NOT EXISTS refused_attempts integer NOT NULL DEFAULT 0;
