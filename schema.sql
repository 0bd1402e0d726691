-- The only schema of the service. Applied with executescript at every start: every statement
-- here must be safe to run again on a database that already has it.
-- Timestamps are UTC ISO 8601 strings with milliseconds, e.g. 2026-11-24T15:18:43.123Z.

CREATE TABLE IF NOT EXISTS projects (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    name                TEXT    NOT NULL UNIQUE CHECK (length(name) > 0),
    dev_environment     TEXT    NOT NULL DEFAULT '',
    grpc_server_address TEXT    NOT NULL DEFAULT '',
    llm_model           TEXT,
    llm_url             TEXT,
    created_time        TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_time        TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- project_id NULL is "no project" (served as 0); deleting a project moves its conversations there.
CREATE TABLE IF NOT EXISTS conversations (
    id            TEXT    PRIMARY KEY,
    system_prompt TEXT,
    project_id    INTEGER REFERENCES projects(id) ON DELETE SET NULL,
    name          TEXT,
    model         TEXT,
    created_at    TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at    TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS conversations_by_project ON conversations(project_id);

CREATE TABLE IF NOT EXISTS messages (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT    NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role            TEXT    NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content         TEXT    NOT NULL,
    status          TEXT    NOT NULL DEFAULT 'complete'
                            CHECK (status IN ('complete', 'streaming', 'interrupted')),
    created_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);

CREATE TABLE IF NOT EXISTS plan_categories (
    id                    INTEGER PRIMARY KEY AUTOINCREMENT,
    name                  TEXT    NOT NULL UNIQUE CHECK (length(name) > 0),
    prompt_template       TEXT    NOT NULL,
    message_method        TEXT    NOT NULL,
    auto_save_category_id INTEGER REFERENCES plan_categories(id) ON DELETE SET NULL,
    is_builtin            INTEGER NOT NULL DEFAULT 0 CHECK (is_builtin IN (0, 1)),
    created_time          TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- Versions are never overwritten: a new text is a new row with the next version.
-- A project with documents cannot be deleted (RESTRICT); the API answers 409 first.
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
