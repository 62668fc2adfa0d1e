-- The W3C trace context of the command that wrote a device message, so the
-- relay's publish joins the command's trace (src/telemetry.rs). NULL when
-- spans are not exported.
ALTER TABLE outbox
    ADD COLUMN traceparent text,
    ADD COLUMN tracestate  text;
