//! The transactional outbox: device messages that commands produce are
//! written here in the command's transaction, and published afterwards
//! with publisher confirms (at-least-once to the device, exactly-once in
//! the database).

use sqlx::PgConnection;

use crate::handlers::DEVICE_EXCHANGE;

/// Writes one device message to the outbox, in the caller's transaction.
///
/// # Errors
/// The database error.
pub async fn enqueue(
    conn: &mut PgConnection,
    message_id: &str,
    routing_key: &str,
    body: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO outbox (message_id, exchange, routing_key, body) VALUES ($1, $2, $3, $4)")
        .bind(message_id)
        .bind(DEVICE_EXCHANGE)
        .bind(routing_key)
        .bind(body)
        .execute(conn)
        .await?;
    Ok(())
}
