use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                r#"
-- The W3C trace context of the span that wrote the row, so the message continues its trace.
-- The ALTER waits for the table's lock, and outbox writes queue behind it: not for long.
SET LOCAL lock_timeout = '5s';
ALTER TABLE payments.outbox ADD COLUMN traceparent TEXT NULL;
"#,
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("ALTER TABLE payments.outbox DROP COLUMN IF EXISTS traceparent")
            .await?;
        Ok(())
    }
}
