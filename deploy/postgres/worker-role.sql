-- The worker's PostgreSQL role: it owns the schema `iot` and the tables the
-- migrations create there, and nothing else (docs/deployment.md, "Least
-- privilege"). Not a superuser, no CREATEDB, no CREATEROLE.
--
-- Run it once, as a superuser (or the database's owner holding CREATEROLE),
-- connected to the worker's database, which must exist already:
--
--   WORKER_DB_USER=iot_worker WORKER_DB_PASSWORD=... \
--       psql -v ON_ERROR_STOP=1 -d worker_iot_core -f deploy/postgres/worker-role.sql
--
-- docker-compose.yml mounts it into the postgres image's
-- /docker-entrypoint-initdb.d/, which runs it with psql on a new volume,
-- connected to POSTGRES_DB. psql 15 or later (\getenv).
--
-- Then the worker (or `create_db`) runs the migrations as that role:
-- DATABASE_URL=postgres://iot_worker:...@host:5432/worker_iot_core.
-- tests/it/deploy.rs runs this file (its two variables set by the test) and
-- the worker on top of it.

\getenv worker_role WORKER_DB_USER
\getenv worker_password WORKER_DB_PASSWORD

CREATE ROLE :"worker_role" LOGIN PASSWORD :'worker_password'
    NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;

-- The worker's tables live in a schema of their own, which the role owns:
-- it can create, alter and drop what is in it (the migrations), and has no
-- right on any other schema beyond what PUBLIC has.
CREATE SCHEMA iot AUTHORIZATION :"worker_role";

-- PUBLIC may create in the schema `public` up to PostgreSQL 14 (15 made
-- this the default): the role would otherwise own whatever it made there.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

-- The worker names its tables without a schema: they resolve here. In a
-- database without a schema `iot` nothing resolves, so nothing is created
-- anywhere else by mistake.
ALTER ROLE :"worker_role" SET search_path = iot;
