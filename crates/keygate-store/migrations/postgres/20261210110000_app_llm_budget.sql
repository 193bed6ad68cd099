-- An app's own LLM budget (issue 17, left from issue 16): what all of the app's keys may spend
-- on LLM calls together, over every ai route, as JSON {"micro_usd", "period"} like a token's
-- `llm_budget`; NULL: none. The gateway reads it with the app's shared limits.
ALTER TABLE apps ADD COLUMN llm_budget TEXT;
