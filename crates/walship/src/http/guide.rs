//! The restore guide: the exact commands to restore this deployment's database, with its
//! paths, replica URL and (on fly.io) app name filled in.

use super::inventory::Listing;
use super::{DbState, now_ms, rfc3339};

/// The guide as text, and its commands alone.
#[derive(Debug)]
pub struct Guide {
    pub text: String,
    pub commands: Vec<String>,
}

/// Quotes a word for sh when it needs it.
fn sh(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./:=@%+,-".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

pub fn restore_guide(d: &DbState, host: &str, listing: Option<&Listing>) -> Guide {
    let db = d.db.path.display().to_string();
    let url = sh(&d.db.replica_url);
    let name = &d.db.name;
    let scratch = format!("/tmp/{name}-restored.db");
    let example_time = listing
        .and_then(|l| l.newest.clone())
        .unwrap_or_else(|| rfc3339(now_ms()));
    let fly = std::env::var("FLY_APP_NAME").ok();
    let mut commands = Vec::new();
    let mut t = String::new();
    let mut cmd = |t: &mut String, c: String| {
        t.push_str("    ");
        t.push_str(&c);
        t.push('\n');
        commands.push(c);
    };
    t.push_str(&format!(
        "Restoring `{name}` ({db}) from {}\n\
         ====================================\n\n",
        d.db.replica_url
    ));
    if let Some(l) = listing {
        t.push_str(&format!(
            "The replica holds {} snapshot(s) in {} generation(s); restorable from {} to {} \
             (listed {}).\n\n",
            l.snapshots,
            l.generations.len(),
            l.oldest_restorable.as_deref().unwrap_or("-"),
            l.newest.as_deref().unwrap_or("-"),
            l.listed_at
        ));
    }
    t.push_str("1. See what the replica holds:\n\n");
    cmd(&mut t, format!("walship generations {url}"));
    t.push_str(
        "\n2. Restore the newest state into a scratch file (the live database is not touched;\n\
         \x20  every object's checksum and PRAGMA integrity_check are verified):\n\n",
    );
    cmd(&mut t, format!("walship restore -o {} {url}", sh(&scratch)));
    t.push_str("\n   ... or the state as of a point in time (RFC 3339, UTC):\n\n");
    cmd(
        &mut t,
        format!(
            "walship restore -o {} --timestamp {} {url}",
            sh(&scratch),
            sh(&example_time)
        ),
    );
    t.push_str(
        "\n3. To replace the live database: stop the application and walship first (a final\n\
         \x20  sync runs on SIGTERM), keep the old file, then restore over it:\n\n",
    );
    cmd(
        &mut t,
        format!("cp {} {}", sh(&db), sh(&format!("{db}.before-restore"))),
    );
    cmd(
        &mut t,
        format!("walship restore --force -o {} {url}", sh(&db)),
    );
    t.push_str(
        "\n   The next `walship replicate` starts a new generation from the restored file.\n\n\
         4. A new machine restores at boot before the application starts (what\n\
         \x20  fly/entrypoint.sh runs):\n\n",
    );
    cmd(
        &mut t,
        format!(
            "walship restore --if-db-not-exists --if-replica-exists -o {} {url}",
            sh(&db)
        ),
    );
    t.push_str("\n5. Or download a restored copy through this server (needs the API token):\n\n");
    cmd(
        &mut t,
        format!(
            "curl -fsS -H \"Authorization: Bearer $WALSHIP_API_TOKEN\" -o {} {}",
            sh(&format!("{name}.db")),
            sh(&format!("http://{host}/api/v1/databases/{name}/download"))
        ),
    );
    cmd(
        &mut t,
        format!(
            "curl -fsS -H \"Authorization: Bearer $WALSHIP_API_TOKEN\" -o {} {}",
            sh(&format!("{name}-at.db")),
            sh(&format!(
                "http://{host}/api/v1/databases/{name}/download?timestamp={example_time}"
            ))
        ),
    );
    if let Some(app) = fly {
        t.push_str(&format!(
            "\n6. On fly.io (app `{app}`), run the commands on the machine, or restore from\n\
             \x20  anywhere with the bucket's credentials:\n\n"
        ));
        cmd(
            &mut t,
            format!(
                "fly ssh console --app {} -C {}",
                sh(&app),
                sh(&format!("walship restore -o {} {url}", sh(&scratch)))
            ),
        );
    }
    t.push_str(
        "\nS3 replicas read credentials from the environment (AWS_ACCESS_KEY_ID /\n\
         AWS_SECRET_ACCESS_KEY, a profile, or AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE).\n\
         More: docs/runbook-restore.md.\n",
    );
    Guide { text: t, commands }
}

#[cfg(test)]
mod tests {
    use super::sh;

    /// Reads back one shell word made of plain characters, `'...'` and `\c`, as POSIX sh
    /// does; `None` if it is not exactly one word or holds anything sh would expand.
    fn one_word(s: &str) -> Option<String> {
        let mut out = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            match c {
                '\'' => loop {
                    match chars.next()? {
                        '\'' => break,
                        c => out.push(c),
                    }
                },
                '\\' => out.push(chars.next()?),
                c if c.is_whitespace() || ";&|<>()$`\"*?[]#~{}!".contains(c) => return None,
                c => out.push(c),
            }
        }
        (!s.is_empty()).then_some(out)
    }

    #[test]
    fn every_value_is_one_word_that_reads_back_as_itself() {
        for v in [
            "x; rm -rf /",
            "x'; rm -rf / #",
            "$(id)",
            "`id`",
            "a b\tc\nd",
            "\"quoted\"",
            "'",
            "''",
            "~root",
            "*",
            "back\\slash",
            "",
            "127.0.0.1:9090",
            "http://x; rm -rf //api/v1/databases/app/download?timestamp=2026-11-23T20:30:00.000Z",
        ] {
            let q = sh(v);
            assert_eq!(one_word(&q).as_deref(), Some(v), "{v:?} quoted as {q:?}");
        }
    }

    #[test]
    fn quotes_only_what_needs_it() {
        assert_eq!(sh("/data/app.db"), "/data/app.db");
        assert_eq!(
            sh("s3://b/p?endpoint=http://x:9000&region=us-east-1"),
            "'s3://b/p?endpoint=http://x:9000&region=us-east-1'"
        );
        assert_eq!(sh("it's"), "'it'\\''s'");
    }
}
