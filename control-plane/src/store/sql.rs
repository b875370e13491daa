//! The SQL both backends share. The statements use `$N` placeholders, which PostgreSQL and
//! sqlx's SQLite driver both accept, so one macro generates each backend's [`WriteTx`] and
//! [`Store`] implementations; a backend supplies its pool, how a write transaction begins
//! (`begin_write`) and the statement that locks the head row.

/// Implements [`WriteTx`] for `$tx` (a struct with a `tx: Transaction<'static, $db>` field)
/// and [`Store`] for `$store` (a struct with a `pool` field and an
/// `async fn begin_write(&self) -> Result<$tx, sqlx::Error>`).
macro_rules! sql_store {
    ($store:ty, $tx:ty, $db:ty, lock_head = $lock_head:literal, notify = $notify:literal) => {
        #[async_trait::async_trait]
        impl $crate::store::WriteTx for $tx {
            async fn lock_head(&mut self) -> Result<Head, sqlx::Error> {
                let (revision, last_sequence, last_hash, last_time): (i64, i64, Vec<u8>, i64) =
                    sqlx::query_as($lock_head)
                        .fetch_one(&mut *self.tx)
                        .await?;
                Ok(Head {
                    revision,
                    last_sequence: last_sequence as u64,
                    last_hash,
                    last_time,
                })
            }

            async fn policy(&mut self, service: &str) -> Result<Option<PolicyRow>, sqlx::Error> {
                sqlx::query_as("SELECT * FROM policies WHERE service = $1")
                    .bind(service)
                    .fetch_optional(&mut *self.tx)
                    .await
            }

            async fn put_policy(&mut self, row: &PolicyRow) -> Result<(), sqlx::Error> {
                sqlx::query(
                    "INSERT INTO policies (service, spec, revision, create_time, update_time, update_actor)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (service) DO UPDATE SET spec = excluded.spec, revision = excluded.revision,
                         update_time = excluded.update_time, update_actor = excluded.update_actor",
                )
                .bind(&row.service)
                .bind(&row.spec)
                .bind(row.revision)
                .bind(row.create_time)
                .bind(row.update_time)
                .bind(&row.update_actor)
                .execute(&mut *self.tx)
                .await
                .map(drop)
            }

            async fn delete_policy(&mut self, service: &str) -> Result<(), sqlx::Error> {
                sqlx::query("DELETE FROM policies WHERE service = $1")
                    .bind(service)
                    .execute(&mut *self.tx)
                    .await
                    .map(drop)
            }

            async fn insert_revision(&mut self, row: &RevisionRow) -> Result<(), sqlx::Error> {
                sqlx::query(
                    "INSERT INTO policy_revisions (revision, service, spec, time, actor, reason, audit_sequence)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(row.revision)
                .bind(&row.service)
                .bind(&row.spec)
                .bind(row.time)
                .bind(&row.actor)
                .bind(&row.reason)
                .bind(row.audit_sequence)
                .execute(&mut *self.tx)
                .await
                .map(drop)
            }

            async fn insert_audit(&mut self, row: &AuditRow) -> Result<(), sqlx::Error> {
                sqlx::query(
                    "INSERT INTO audit_events (sequence, time, actor, method, service, revision, before_spec,
                         after_spec, changed_fields, reason, request_id, peer, outcome, error, prev_hash, hash,
                         origin_set, affected_services)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
                )
                .bind(row.sequence)
                .bind(row.time)
                .bind(&row.actor)
                .bind(&row.method)
                .bind(&row.service)
                .bind(row.revision)
                .bind(&row.before_spec)
                .bind(&row.after_spec)
                .bind(&row.changed_fields)
                .bind(&row.reason)
                .bind(&row.request_id)
                .bind(&row.peer)
                .bind(&row.outcome)
                .bind(&row.error)
                .bind(&row.prev_hash)
                .bind(&row.hash)
                .bind(&row.origin_set)
                .bind(&row.affected_services)
                .execute(&mut *self.tx)
                .await
                .map(drop)
            }

            async fn set_head(&mut self, head: &Head) -> Result<(), sqlx::Error> {
                sqlx::query("UPDATE head SET revision = $1, last_sequence = $2, last_hash = $3, last_time = $4 WHERE id = 1")
                    .bind(head.revision)
                    .bind(head.last_sequence as i64)
                    .bind(&head.last_hash)
                    .bind(head.last_time)
                    .execute(&mut *self.tx)
                    .await
                    .map(drop)
            }

            async fn count_tokens(&mut self) -> Result<i64, sqlx::Error> {
                let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM tokens")
                    .fetch_one(&mut *self.tx)
                    .await?;
                Ok(count)
            }

            async fn put_token(&mut self, t: &$crate::store::TokenRecord) -> Result<(), sqlx::Error> {
                sqlx::query(
                    "INSERT INTO tokens (id, name, role, services, secret_hash, created_at, created_by, expires_at, revoked_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(&t.id)
                .bind(&t.name)
                .bind(&t.role)
                .bind(&t.services)
                .bind(&t.secret_hash)
                .bind(t.created_at)
                .bind(&t.created_by)
                .bind(t.expires_at)
                .bind(t.revoked_at)
                .execute(&mut *self.tx)
                .await
                .map(drop)
            }

            async fn revoke_token(&mut self, id: &str, at: i64) -> Result<bool, sqlx::Error> {
                Ok(sqlx::query("UPDATE tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                    .bind(at)
                    .bind(id)
                    .execute(&mut *self.tx)
                    .await?
                    .rows_affected()
                    == 1)
            }

            async fn notify(&mut self, revision: i64) -> Result<(), sqlx::Error> {
                if $notify.is_empty() {
                    return Ok(());
                }
                sqlx::query($notify)
                    .bind(revision.to_string())
                    .execute(&mut *self.tx)
                    .await
                    .map(drop)
            }

            async fn commit(self: Box<Self>) -> Result<(), sqlx::Error> {
                self.tx.commit().await
            }

            async fn set_versions(&mut self) -> Result<Vec<(String, i64)>, sqlx::Error> {
                sqlx::query_as("SELECT name, revision FROM origin_sets")
                    .fetch_all(&mut *self.tx)
                    .await
            }

            async fn origin_set(&mut self, name: &str) -> Result<Option<$crate::store::origin_sets::SetRow>, sqlx::Error> {
                sqlx::query_as("SELECT * FROM origin_sets WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&mut *self.tx)
                    .await
            }

            async fn put_origin_set(&mut self, row: &$crate::store::origin_sets::SetRow) -> Result<(), sqlx::Error> {
                sqlx::query(
                    "INSERT INTO origin_sets (name, spec, revision, create_time, update_time, update_actor)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, revision = excluded.revision,
                         update_time = excluded.update_time, update_actor = excluded.update_actor",
                )
                .bind(&row.name)
                .bind(&row.spec)
                .bind(row.revision)
                .bind(row.create_time)
                .bind(row.update_time)
                .bind(&row.update_actor)
                .execute(&mut *self.tx)
                .await
                .map(drop)
            }

            async fn delete_origin_set(&mut self, name: &str) -> Result<(), sqlx::Error> {
                sqlx::query("DELETE FROM origin_sets WHERE name = $1")
                    .bind(name)
                    .execute(&mut *self.tx)
                    .await
                    .map(drop)
            }

            async fn insert_set_revision(&mut self, row: &$crate::store::origin_sets::SetRevisionRow) -> Result<(), sqlx::Error> {
                sqlx::query(
                    "INSERT INTO origin_set_revisions (revision, name, spec, time, actor, reason, audit_sequence, affected)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(row.revision)
                .bind(&row.name)
                .bind(&row.spec)
                .bind(row.time)
                .bind(&row.actor)
                .bind(&row.reason)
                .bind(row.audit_sequence)
                .bind(&row.affected)
                .execute(&mut *self.tx)
                .await
                .map(drop)
            }

            async fn referrer_policies(&mut self, name: &str) -> Result<Vec<PolicyRow>, sqlx::Error> {
                sqlx::query_as(
                    "SELECT p.* FROM policies p JOIN origin_set_refs r ON r.service = p.service
                     WHERE r.set_name = $1 ORDER BY p.service",
                )
                .bind(name)
                .fetch_all(&mut *self.tx)
                .await
            }

            async fn set_refs(&mut self, service: &str, sets: &[String]) -> Result<(), sqlx::Error> {
                sqlx::query("DELETE FROM origin_set_refs WHERE service = $1")
                    .bind(service)
                    .execute(&mut *self.tx)
                    .await?;
                for set in sets {
                    sqlx::query("INSERT INTO origin_set_refs (set_name, service) VALUES ($1, $2)")
                        .bind(set)
                        .bind(service)
                        .execute(&mut *self.tx)
                        .await?;
                }
                Ok(())
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            async fn write(&self, ctx: WriteContext, plan: Planner) -> Result<Written, StoreError> {
                let tx = self.begin_write().await?;
                write_in(Box::new(tx), &self.sets, ctx, plan).await
            }

            async fn write_set(
                &self,
                ctx: WriteContext,
                name: &str,
                plan: $crate::store::SetPlanner,
            ) -> Result<$crate::store::SetWritten, StoreError> {
                let tx = self.begin_write().await?;
                $crate::store::origin_sets::write_set_in(Box::new(tx), &self.sets, ctx, name, plan).await
            }

            async fn get_origin_set(&self, name: &str) -> Result<Option<$crate::store::StoredSet>, StoreError> {
                let row: Option<$crate::store::origin_sets::SetRow> =
                    sqlx::query_as("SELECT * FROM origin_sets WHERE name = $1")
                        .bind(name)
                        .fetch_optional(&self.pool)
                        .await?;
                row.map($crate::store::StoredSet::try_from).transpose()
            }

            async fn list_origin_sets(
                &self,
                after: Option<&str>,
                limit: u32,
            ) -> Result<Vec<$crate::store::StoredSet>, StoreError> {
                let rows: Vec<$crate::store::origin_sets::SetRow> = sqlx::query_as(
                    "SELECT * FROM origin_sets WHERE name > $1 ORDER BY name LIMIT $2",
                )
                .bind(after.unwrap_or(""))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                convert(rows)
            }

            async fn list_set_revisions(
                &self,
                name: &str,
                before: Option<i64>,
                limit: u32,
            ) -> Result<Vec<$crate::store::SetRevisionRecord>, StoreError> {
                let rows: Vec<$crate::store::origin_sets::SetRevisionRow> = sqlx::query_as(
                    "SELECT * FROM origin_set_revisions WHERE name = $1 AND revision < $2
                     ORDER BY revision DESC LIMIT $3",
                )
                .bind(name)
                .bind(before.unwrap_or(i64::MAX))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                convert(rows)
            }

            async fn get_set_revision(
                &self,
                revision: i64,
            ) -> Result<Option<$crate::store::SetRevisionRecord>, StoreError> {
                let row: Option<$crate::store::origin_sets::SetRevisionRow> =
                    sqlx::query_as("SELECT * FROM origin_set_revisions WHERE revision = $1")
                        .bind(revision)
                        .fetch_optional(&self.pool)
                        .await?;
                row.map($crate::store::SetRevisionRecord::try_from).transpose()
            }

            async fn set_revisions_after(
                &self,
                after: i64,
                limit: u32,
            ) -> Result<Vec<$crate::store::SetRevisionRecord>, StoreError> {
                let rows: Vec<$crate::store::origin_sets::SetRevisionRow> = sqlx::query_as(
                    "SELECT * FROM origin_set_revisions WHERE revision > $1 ORDER BY revision LIMIT $2",
                )
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                convert(rows)
            }

            async fn resolved_sets(&self) -> Result<$crate::store::ResolvedSets, StoreError> {
                let versions: Vec<(String, i64)> =
                    sqlx::query_as("SELECT name, revision FROM origin_sets")
                        .fetch_all(&self.pool)
                        .await?;
                let mut out = std::collections::HashMap::with_capacity(versions.len());
                for (name, revision) in versions {
                    let set = match self.sets.cached(&name, revision) {
                        Some(set) => set,
                        None => {
                            // Read at its revision or later; a later one is cached under its
                            // own revision, and this read reports what it read.
                            let row: Option<$crate::store::origin_sets::SetRow> =
                                sqlx::query_as("SELECT * FROM origin_sets WHERE name = $1")
                                    .bind(&name)
                                    .fetch_optional(&self.pool)
                                    .await?;
                            let Some(row) = row else { continue };
                            let revision = row.revision;
                            let set = self.sets.remember(Some(row))?;
                            out.insert(name, (revision, set));
                            continue;
                        }
                    };
                    out.insert(name, (revision, set));
                }
                Ok($crate::store::ResolvedSets(out))
            }

            async fn set_referrers(&self, name: &str) -> Result<Vec<String>, StoreError> {
                let rows: Vec<(String,)> = sqlx::query_as(
                    "SELECT service FROM origin_set_refs WHERE set_name = $1 ORDER BY service",
                )
                .bind(name)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(|(s,)| s).collect())
            }

            async fn get_policy(&self, service: &str) -> Result<Option<StoredPolicy>, StoreError> {
                let row: Option<PolicyRow> = sqlx::query_as("SELECT * FROM policies WHERE service = $1")
                    .bind(service)
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(StoredPolicy::try_from).transpose()
            }

            async fn list_policies(
                &self,
                prefix: &str,
                after: Option<&str>,
                limit: u32,
            ) -> Result<Vec<StoredPolicy>, StoreError> {
                let rows: Vec<PolicyRow> = sqlx::query_as(
                    "SELECT * FROM policies WHERE service LIKE $1 ESCAPE '\\' AND service > $2
                     ORDER BY service LIMIT $3",
                )
                .bind(like_prefix(prefix))
                .bind(after.unwrap_or(""))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                convert(rows)
            }

            async fn list_revisions(
                &self,
                service: &str,
                before: Option<i64>,
                limit: u32,
            ) -> Result<Vec<RevisionRecord>, StoreError> {
                let rows: Vec<RevisionRow> = sqlx::query_as(
                    "SELECT * FROM policy_revisions WHERE service = $1 AND revision < $2
                     ORDER BY revision DESC LIMIT $3",
                )
                .bind(service)
                .bind(before.unwrap_or(i64::MAX))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                convert(rows)
            }

            async fn get_revision(&self, revision: i64) -> Result<Option<RevisionRecord>, StoreError> {
                let row: Option<RevisionRow> =
                    sqlx::query_as("SELECT * FROM policy_revisions WHERE revision = $1")
                        .bind(revision)
                        .fetch_optional(&self.pool)
                        .await?;
                row.map(RevisionRecord::try_from).transpose()
            }

            async fn list_audit(
                &self,
                filter: &AuditFilter,
                cursor: Option<AuditCursor>,
                limit: u32,
            ) -> Result<Vec<AuditEvent>, StoreError> {
                let mut q = sqlx::QueryBuilder::<$db>::new("SELECT * FROM audit_events WHERE 1 = 1");
                for (column, value) in filter.equalities() {
                    q.push(format_args!(" AND {column} = "))
                        .push_bind(value.to_owned());
                }
                if let Some(since) = filter.since {
                    q.push(" AND time >= ").push_bind(since);
                }
                if let Some(until) = filter.until {
                    q.push(" AND time < ").push_bind(until);
                }
                if let Some((time, sequence)) = cursor {
                    q.push(" AND (time, sequence) < (").push_bind(time);
                    q.push(", ").push_bind(sequence as i64).push(")");
                }
                q.push(" ORDER BY time DESC, sequence DESC LIMIT ")
                    .push_bind(i64::from(limit));
                let rows: Vec<AuditRow> = q.build_query_as().fetch_all(&self.pool).await?;
                convert(rows)
            }

            async fn get_audit(&self, sequence: u64) -> Result<Option<AuditEvent>, StoreError> {
                let row: Option<AuditRow> =
                    sqlx::query_as("SELECT * FROM audit_events WHERE sequence = $1")
                        .bind(sequence as i64)
                        .fetch_optional(&self.pool)
                        .await?;
                row.map(AuditEvent::try_from).transpose()
            }

            async fn audit_after(&self, after: u64, limit: u32) -> Result<Vec<AuditEvent>, StoreError> {
                let rows: Vec<AuditRow> = sqlx::query_as(
                    "SELECT * FROM audit_events WHERE sequence > $1 ORDER BY sequence LIMIT $2",
                )
                .bind(after as i64)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                convert(rows)
            }

            async fn head(&self) -> Result<Head, StoreError> {
                let (revision, last_sequence, last_hash, last_time): (i64, i64, Vec<u8>, i64) =
                    sqlx::query_as(
                        "SELECT revision, last_sequence, last_hash, last_time FROM head WHERE id = 1",
                    )
                    .fetch_one(&self.pool)
                    .await?;
                Ok(Head {
                    revision,
                    last_sequence: last_sequence as u64,
                    last_hash,
                    last_time,
                })
            }

            async fn revisions_after(&self, after: i64, limit: u32) -> Result<Vec<RevisionRecord>, StoreError> {
                let rows: Vec<RevisionRow> = sqlx::query_as(
                    "SELECT * FROM policy_revisions WHERE revision > $1 ORDER BY revision LIMIT $2",
                )
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                convert(rows)
            }

            async fn follow(&self, nudges: tokio::sync::mpsc::Sender<$crate::store::Nudge>) {
                self.follow_changes(nudges).await
            }

            async fn save_sidecars(&self, rows: &[$crate::store::SidecarRecord]) -> Result<(), StoreError> {
                if rows.is_empty() {
                    return Ok(());
                }
                let mut tx = self.pool.begin().await?;
                for r in rows {
                    sqlx::query(
                        "INSERT INTO sidecars (sidecar_id, services, version, host, control_plane, connected_since,
                             last_seen, last_sent_revision, last_acked_revision, state, nack_error, disconnected_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                         ON CONFLICT (sidecar_id) DO UPDATE SET services = excluded.services,
                             version = excluded.version, host = excluded.host,
                             control_plane = excluded.control_plane, connected_since = excluded.connected_since,
                             last_seen = excluded.last_seen, last_sent_revision = excluded.last_sent_revision,
                             last_acked_revision = excluded.last_acked_revision, state = excluded.state,
                             nack_error = excluded.nack_error, disconnected_at = excluded.disconnected_at
                         WHERE excluded.connected_since >= sidecars.connected_since",
                    )
                    .bind(&r.sidecar_id)
                    .bind(&r.services)
                    .bind(&r.version)
                    .bind(&r.host)
                    .bind(&r.control_plane)
                    .bind(r.connected_since)
                    .bind(r.last_seen)
                    .bind(r.last_sent_revision)
                    .bind(r.last_acked_revision)
                    .bind(&r.state)
                    .bind(&r.nack_error)
                    .bind(r.disconnected_at)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn list_sidecars(
                &self,
                service: &str,
                state: &str,
                after: &str,
                limit: u32,
            ) -> Result<Vec<$crate::store::SidecarRecord>, StoreError> {
                let mut q = sqlx::QueryBuilder::<$db>::new("SELECT * FROM sidecars WHERE sidecar_id > ");
                q.push_bind(after.to_owned());
                if !service.is_empty() {
                    q.push(" AND (services = '' OR ',' || services || ',' LIKE ")
                        .push_bind(format!("%,{},%", service.replace(['%', '_', '\\'], "")))
                        .push(")");
                }
                if !state.is_empty() {
                    q.push(" AND state = ").push_bind(state.to_owned());
                }
                q.push(" ORDER BY sidecar_id LIMIT ").push_bind(i64::from(limit));
                Ok(q.build_query_as().fetch_all(&self.pool).await?)
            }

            async fn get_sidecar(&self, id: &str) -> Result<Option<$crate::store::SidecarRecord>, StoreError> {
                Ok(sqlx::query_as("SELECT * FROM sidecars WHERE sidecar_id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn get_token(&self, id: &str) -> Result<Option<$crate::store::TokenRecord>, StoreError> {
                Ok(sqlx::query_as("SELECT * FROM tokens WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn secret(&self, name: &str, candidate: &[u8]) -> Result<Vec<u8>, StoreError> {
                sqlx::query("INSERT INTO secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
                    .bind(name)
                    .bind(candidate)
                    .execute(&self.pool)
                    .await?;
                let (value,): (Vec<u8>,) = sqlx::query_as("SELECT value FROM secrets WHERE name = $1")
                    .bind(name)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(value)
            }

            async fn list_tokens_page(
                &self,
                after: Option<(i64, &str)>,
                limit: u32,
            ) -> Result<Vec<$crate::store::TokenRecord>, StoreError> {
                let (time, id) = after.unwrap_or((i64::MIN, ""));
                Ok(sqlx::query_as(
                    "SELECT * FROM tokens WHERE created_at > $1 OR (created_at = $1 AND id > $2)
                     ORDER BY created_at, id LIMIT $3",
                )
                .bind(time)
                .bind(id)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?)
            }

            async fn list_tokens(&self) -> Result<Vec<$crate::store::TokenRecord>, StoreError> {
                Ok(sqlx::query_as("SELECT * FROM tokens ORDER BY created_at, id")
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn prune_sidecars(&self, before: i64) -> Result<u64, StoreError> {
                Ok(sqlx::query("DELETE FROM sidecars WHERE state = 'DISCONNECTED' AND disconnected_at < $1")
                    .bind(before)
                    .execute(&self.pool)
                    .await?
                    .rows_affected())
            }
        }
    };
}

pub(crate) use sql_store;
