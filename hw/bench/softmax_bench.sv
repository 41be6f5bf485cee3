// tqt_softmax_row with its memories: ROWS rows of up to L_MAX scores and their mask, and the
// probabilities and steps it writes (words as wide as their $readmemh hex digits). A bench loads the
// memories, pulses `start` once per row with `row` and `len` set, and reads the results after `done`.
module softmax_bench #(
    parameter int ROWS = 1,
    parameter int L_MAX = 16,
    parameter int LEN_W = 8,
    parameter int SC_W = 22,
    parameter int X_W = 24,
    parameter int XF_W = 27,
    parameter int Z_IN_W = 26,
    parameter int Z_W = 9,
    parameter int L_W = 38,
    parameter int S_W = 47,
    parameter int B_P = 8,
    parameter int ROUNDING = 2,
    parameter int SHIFT_W = 8,
    parameter int MAX_LEFT = 0,
    parameter longint Q_LN2 = 64'd181704,
    parameter longint Q_B = 64'd354684,
    parameter longint Q_C = 64'd66012017480,
    parameter longint MAGIC = 0,
    parameter int MAGIC_S = 0,
    parameter bit RECIPROCAL = 0
) (
    input  logic                      clk,
    input  logic                      rst,
    input  logic                      start,
    input  logic                      load,  // read the input memories from <mem_dir>/<name>.hex
    input  logic                      dump,  // write the result memories to <mem_dir>/<name>.out.hex
    input  logic [15:0]               row,
    input  logic [LEN_W-1:0]          len,
    input  logic signed [X_W-1:0]     clamp,
    input  logic signed [SHIFT_W-1:0] shift,
    output logic                      done
);
  localparam int SC_H = 4 * ((SC_W + 3) / 4), P_H = 4 * ((B_P + 3) / 4);
  logic [SC_H-1:0] mem_score [ROWS*L_MAX];
  logic [3:0] mem_visible [ROWS*L_MAX];
  logic [P_H-1:0] mem_p [ROWS*L_MAX];
  logic signed [63:0] mem_x [ROWS*L_MAX], mem_x_f [ROWS*L_MAX], mem_z [ROWS*L_MAX], mem_l [ROWS*L_MAX],
                      mem_e [ROWS*L_MAX];
  logic signed [63:0] mem_s [ROWS], mem_t [ROWS], mem_r [ROWS];

  logic [LEN_W-1:0] rd_addr, out_addr;
  logic signed [SC_W-1:0] rd_score;
  logic rd_visible, out_valid, unit_done;
  logic [B_P-1:0] out_p;
  logic [S_W-1:0] row_sum;
  logic signed [7:0] row_t;
  logic [B_P+9:0] row_r;
  logic signed [X_W-1:0] out_x;
  logic signed [XF_W-1:0] out_x_f;
  logic [Z_W-1:0] out_z;
  logic [L_W-1:0] out_l, out_e;
  int base;
  assign base = int'(row) * L_MAX;

  always_ff @(posedge clk) begin  // synchronous reads: the data one cycle after the address
    rd_score <= mem_score[base + int'(rd_addr)][SC_W-1:0];
    rd_visible <= mem_visible[base + int'(rd_addr)][0];
    if (out_valid) begin
      mem_p[base + int'(out_addr)] <= P_H'(out_p);
      mem_x[base + int'(out_addr)] <= 64'(out_x);
      mem_x_f[base + int'(out_addr)] <= 64'(out_x_f);
      mem_z[base + int'(out_addr)] <= 64'(out_z);
      mem_l[base + int'(out_addr)] <= 64'(out_l);
      mem_e[base + int'(out_addr)] <= 64'(out_e);
    end
    if (unit_done) begin
      mem_s[row] <= 64'(row_sum);
      mem_t[row] <= 64'(row_t);
      mem_r[row] <= 64'(row_r);
    end
  end
  assign done = unit_done;

  // the memories' files (+mem_dir=): a whole memory per pulse, no simulator call per word
  string mem_dir;
  initial if (!$value$plusargs("mem_dir=%s", mem_dir)) mem_dir = ".";
  always @(posedge load) begin
    $readmemh({mem_dir, "/mem_score.hex"}, mem_score);
    $readmemh({mem_dir, "/mem_visible.hex"}, mem_visible);
  end
  always @(posedge dump) begin
    $writememh({mem_dir, "/mem_p.out.hex"}, mem_p);
    $writememh({mem_dir, "/mem_x.out.hex"}, mem_x);
    $writememh({mem_dir, "/mem_x_f.out.hex"}, mem_x_f);
    $writememh({mem_dir, "/mem_z.out.hex"}, mem_z);
    $writememh({mem_dir, "/mem_l.out.hex"}, mem_l);
    $writememh({mem_dir, "/mem_e.out.hex"}, mem_e);
    $writememh({mem_dir, "/mem_s.out.hex"}, mem_s);
    $writememh({mem_dir, "/mem_t.out.hex"}, mem_t);
    $writememh({mem_dir, "/mem_r.out.hex"}, mem_r);
  end

  tqt_softmax_row #(.LEN_W(LEN_W), .SC_W(SC_W), .X_W(X_W), .XF_W(XF_W), .Z_IN_W(Z_IN_W), .Z_W(Z_W),
                    .L_W(L_W), .S_W(S_W), .B_P(B_P), .ROUNDING(ROUNDING), .SHIFT_W(SHIFT_W),
                    .MAX_LEFT(MAX_LEFT), .Q_LN2(Q_LN2), .Q_B(Q_B), .Q_C(Q_C), .MAGIC(MAGIC),
                    .MAGIC_S(MAGIC_S), .RECIPROCAL(RECIPROCAL))
      unit (.clk(clk), .rst(rst), .start(start), .len(len), .clamp(clamp), .shift(shift), .rd_addr(rd_addr),
            .rd_score(rd_score), .rd_visible(rd_visible), .out_valid(out_valid), .out_addr(out_addr),
            .out_p(out_p), .done(unit_done), .row_sum(row_sum), .row_t(row_t), .row_r(row_r), .out_x(out_x), .out_x_f(out_x_f),
            .out_z(out_z), .out_l(out_l), .out_e(out_e));
endmodule
