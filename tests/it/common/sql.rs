//! The shipped SQL scripts of deploy/postgres/, run as psql would run them
//! (docs/deployment.md, "Least privilege"), on a test's connection.

use std::path::Path;

use sqlx::PgConnection;

/// Loads a script of deploy/postgres/ as psql would run it, and runs it on
/// `conn`: its `\getenv` lines give way to `vars`, whose `:"name"` (an
/// identifier) and `:'name'` (a literal) are quoted as psql quotes them.
/// Panics on any other psql command, on a variable left unset, and on an
/// error of the script.
pub async fn run_script(conn: &mut PgConnection, name: &str, vars: &[(&str, &str)]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/postgres").join(name);
    let source = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let sql = substitute(name, &source, vars);
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(conn)
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
}

/// `source` without its `\getenv` lines, with `vars` in place.
fn substitute(name: &str, source: &str, vars: &[(&str, &str)]) -> String {
    let mut sql = String::new();
    for line in source.lines() {
        if line.starts_with("\\getenv ") {
            continue;
        }
        assert!(
            !line.starts_with('\\'),
            "{name}: a psql command the test does not know: {line}"
        );
        let mut line = line.to_owned();
        for (var, value) in vars {
            line = line
                .replace(&format!(":\"{var}\""), &format!("\"{}\"", value.replace('"', "\"\"")))
                .replace(&format!(":'{var}'"), &format!("'{}'", value.replace('\'', "''")));
        }
        sql.push_str(&line);
        sql.push('\n');
    }
    assert!(
        !sql.contains(":\"") && !sql.contains(":'"),
        "{name}: a psql variable left unset:\n{sql}"
    );
    sql
}
