-- The only schema of the service: what a new database is made of. Every statement is safe to
-- run again (IF NOT EXISTS, INSERT OR IGNORE): after a database from an earlier release has been
-- upgraded by the steps in server.py (MIGRATIONS), this file runs on it too, to add what is new.
-- PRAGMA user_version records the schema's version (server.py's SCHEMA_VERSION), set at the
-- end: so `sqlite3 chat.db < schema.sql` makes a database the server opens as it is.
-- Timestamps are UTC ISO 8601 strings with milliseconds, e.g. 2026-11-24T15:18:43.123Z.

CREATE TABLE IF NOT EXISTS projects (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    name                TEXT    NOT NULL UNIQUE CHECK (length(name) > 0),
    dev_environment     TEXT    NOT NULL DEFAULT '',
    grpc_server_address TEXT    NOT NULL DEFAULT '',
    llm_model           TEXT,
    llm_url             TEXT,
    git_work_dir        TEXT,
    ai_work_dir         TEXT,
    created_time        TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_time        TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- project_id NULL is "no project" (served as 0); deleting a project moves its conversations there.
-- status: 0 normal, 1 archived. metadata: the OpenAI Conversations API's, a JSON object.
CREATE TABLE IF NOT EXISTS conversations (
    id              TEXT    PRIMARY KEY,
    system_prompt   TEXT,
    project_id      INTEGER REFERENCES projects(id) ON DELETE SET NULL,
    name            TEXT,
    model           TEXT,
    assistance_role TEXT,
    status          INTEGER NOT NULL DEFAULT 0 CHECK (status IN (0, 1)),
    metadata        TEXT,
    created_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS conversations_by_project ON conversations(project_id);
CREATE INDEX IF NOT EXISTS conversations_by_update ON conversations(updated_at);

-- attachments: a JSON array of {url, name, content_type}; tool_calls: a JSON array of OpenAI
-- tool calls made by an assistant message; tool_call_id: what a 'tool' message answers.
-- kind 'summary': a compaction's summary (role 'system'), standing for the messages with ids
-- covers_first..covers_last of its conversation, which stay stored; NULL for every other message.
CREATE TABLE IF NOT EXISTS messages (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT    NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role            TEXT    NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
    content         TEXT    NOT NULL,
    status          TEXT    NOT NULL DEFAULT 'complete'
                            CHECK (status IN ('complete', 'streaming', 'interrupted')),
    attachments     TEXT,
    tool_calls      TEXT,
    tool_call_id    TEXT,
    created_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    kind            TEXT    CHECK (kind IS NULL OR kind = 'summary'),
    covers_first    INTEGER,
    covers_last     INTEGER
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
-- A conversation's summaries, the newest first, without a walk over its messages.
CREATE INDEX IF NOT EXISTS messages_summaries ON messages(conversation_id, id)
    WHERE kind = 'summary';

CREATE TABLE IF NOT EXISTS plan_categories (
    id                    INTEGER PRIMARY KEY AUTOINCREMENT,
    name                  TEXT    NOT NULL UNIQUE CHECK (length(name) > 0),
    prompt_template       TEXT    NOT NULL,
    message_method        TEXT    NOT NULL,
    auto_save_category_id INTEGER REFERENCES plan_categories(id) ON DELETE SET NULL,
    is_builtin            INTEGER NOT NULL DEFAULT 0 CHECK (is_builtin IN (0, 1)),
    summary_model         TEXT,
    created_time          TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- Versions are never overwritten: a new text is a new row with the next version. Deleting a
-- project or a category deletes its documents in the same transaction (server.py); RESTRICT
-- keeps anything else from orphaning them.
CREATE TABLE IF NOT EXISTS plan_documents (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id     INTEGER NOT NULL REFERENCES projects(id) ON DELETE RESTRICT,
    category_id    INTEGER NOT NULL REFERENCES plan_categories(id) ON DELETE RESTRICT,
    filename       TEXT    NOT NULL CHECK (length(filename) > 0),
    content        TEXT    NOT NULL,
    version        INTEGER NOT NULL CHECK (version >= 1),
    source         TEXT    NOT NULL DEFAULT 'user' CHECK (source IN ('user', 'server', 'chat')),
    related_log_id INTEGER,
    created_time   TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (project_id, category_id, filename, version)
);
CREATE INDEX IF NOT EXISTS plan_documents_by_category ON plan_documents(category_id);

CREATE TABLE IF NOT EXISTS document_tags (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    document_id  INTEGER NOT NULL REFERENCES plan_documents(id) ON DELETE CASCADE,
    tag_name     TEXT    NOT NULL CHECK (length(tag_name) > 0),
    created_time TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (document_id, tag_name)
);
CREATE INDEX IF NOT EXISTS document_tags_by_name ON document_tags(tag_name);

-- A project's knowledge (conversation_id NULL) or one conversation's own.
CREATE TABLE IF NOT EXISTS document_references (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id      INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    conversation_id TEXT    REFERENCES conversations(id) ON DELETE CASCADE,
    document_id     INTEGER NOT NULL REFERENCES plan_documents(id) ON DELETE CASCADE,
    reference_type  TEXT    NOT NULL CHECK (reference_type IN ('project', 'conversation')),
    created_time    TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE UNIQUE INDEX IF NOT EXISTS project_references_once
    ON document_references(project_id, document_id) WHERE conversation_id IS NULL;
CREATE UNIQUE INDEX IF NOT EXISTS conversation_references_once
    ON document_references(conversation_id, document_id) WHERE conversation_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS document_references_by_document ON document_references(document_id);

-- A stored OpenAI Responses API response: a turn of a conversation. first_message_id and
-- last_message_id bound the turn's messages (its input, then its output); body is the response
-- object as served, JSON.
CREATE TABLE IF NOT EXISTS responses (
    id               TEXT    PRIMARY KEY,
    conversation_id  TEXT    NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    first_message_id INTEGER,
    last_message_id  INTEGER,
    body             TEXT    NOT NULL,
    created_at       TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS responses_by_conversation ON responses(conversation_id);

-- Keys the server makes for itself and keeps (the one that seals compaction items, say).
CREATE TABLE IF NOT EXISTS server_secrets (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);

-- Full-text search (trigram: any language, Chinese without spaces included). External-content
-- tables kept in step by triggers. A reply is indexed once it stops streaming, so that the
-- appends of a streaming reply do not re-index its growing text twice a second.
CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts
    USING fts5(content, content='messages', content_rowid='id', tokenize='trigram');
CREATE TRIGGER IF NOT EXISTS messages_fts_insert AFTER INSERT ON messages
    WHEN new.status != 'streaming' BEGIN
    INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER IF NOT EXISTS messages_fts_delete AFTER DELETE ON messages
    WHEN old.status != 'streaming' BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;
-- One trigger, its two steps in this order: SQLite runs several triggers of an event newest
-- first, and the old text's removal after the new text's insertion damages the index.
CREATE TRIGGER IF NOT EXISTS messages_fts_update AFTER UPDATE OF content, status ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, content)
    SELECT 'delete', old.id, old.content WHERE old.status != 'streaming';
    INSERT INTO messages_fts (rowid, content)
    SELECT new.id, new.content WHERE new.status != 'streaming';
END;

CREATE VIRTUAL TABLE IF NOT EXISTS documents_fts
    USING fts5(filename, content, content='plan_documents', content_rowid='id',
               tokenize='trigram');
CREATE TRIGGER IF NOT EXISTS documents_fts_insert AFTER INSERT ON plan_documents BEGIN
    INSERT INTO documents_fts (rowid, filename, content)
    VALUES (new.id, new.filename, new.content);
END;
CREATE TRIGGER IF NOT EXISTS documents_fts_delete AFTER DELETE ON plan_documents BEGIN
    INSERT INTO documents_fts (documents_fts, rowid, filename, content)
    VALUES ('delete', old.id, old.filename, old.content);
END;
CREATE TRIGGER IF NOT EXISTS documents_fts_update AFTER UPDATE OF filename, content
    ON plan_documents BEGIN
    INSERT INTO documents_fts (documents_fts, rowid, filename, content)
    VALUES ('delete', old.id, old.filename, old.content);
    INSERT INTO documents_fts (rowid, filename, content)
    VALUES (new.id, new.filename, new.content);
END;

-- Built-in categories, with fixed ids so that clients may rely on them (the seed's 知识库 is 5).
-- {doc} is the document, {env} the project's dev_environment. INSERT OR IGNORE keeps restarts
-- from duplicating them and leaves any edits a user made in place.
INSERT OR IGNORE INTO plan_categories
    (id, name, prompt_template, message_method, auto_save_category_id, is_builtin)
VALUES
    (1, '需求计划', '请根据以下需求文档生成详细的开发计划：' || char(10) || char(10) || '开发环境：{env}' || char(10) || char(10) || '需求内容：' || char(10) || '{doc}', 'PlanGetRequest', 2, 1),
    (2, '开发计划', '请执行以下开发计划：' || char(10) || char(10) || '开发环境：{env}' || char(10) || char(10) || '计划内容：' || char(10) || '{doc}', 'PlanExecuteRequest', NULL, 1),
    (3, '测试计划', '请根据以下测试计划进行测试：' || char(10) || char(10) || '开发环境：{env}' || char(10) || char(10) || '测试内容：' || char(10) || '{doc}', 'PlanExecuteRequest', NULL, 1),
    (4, '整改计划', '请根据以下整改计划进行代码整改：' || char(10) || char(10) || '开发环境：{env}' || char(10) || char(10) || '整改内容：' || char(10) || '{doc}', 'PlanExecuteRequest', NULL, 1),
    (5, '知识库', '{doc}', 'PlanGetRequest', NULL, 1),
    (6, '需求评审', '请评审以下需求文档，指出遗漏、矛盾和不可验证之处，并给出修改建议：' || char(10) || char(10) || '开发环境：{env}' || char(10) || char(10) || '需求内容：' || char(10) || '{doc}', 'PlanGetRequest', 1, 1),
    (7, '方案设计', '请根据以下需求设计技术方案，包括模块划分、接口与数据结构：' || char(10) || char(10) || '开发环境：{env}' || char(10) || char(10) || '需求内容：' || char(10) || '{doc}', 'PlanGetRequest', 2, 1);

-- Equal to server.py's SCHEMA_VERSION (a test checks): raise both together.
PRAGMA user_version = 3;
