use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                // The cap on a user's NEW orders counts them on every create_order.
                "CREATE INDEX orders_new_by_user_idx ON orders.orders (user_id) WHERE status = 'NEW'",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP INDEX IF EXISTS orders.orders_new_by_user_idx")
            .await?;
        Ok(())
    }
}
